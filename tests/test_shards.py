"""The shard format: a shard directory carries its tokenizer and still works when moved."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scratchllm.data.loader import load_tokens
from scratchllm.data.prepare import PrepareOptions, prepare
from scratchllm.data.shards import TOKENIZER_FILE, read_meta, shard_tokenizer_path
from scratchllm.errors import UserError
from scratchllm.tokenizer import Tokenizer, load_tokenizer

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture
def corpus(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT * 20)
    (src / "b.txt").write_text(TEXT.upper() * 20)
    return src


@pytest.fixture
def tok_file(tmp_path, shakespeare_small) -> Path:
    """A tokenizer in a directory of its own, so a test can delete it."""
    path = tmp_path / "tok" / "t.json"
    path.parent.mkdir()
    Tokenizer.train([shakespeare_small[:50_000]], vocab_size=300).save(path)
    return path


def test_moved_shard_dir_works_without_the_original_tokenizer(tmp_path, corpus, tok_file):
    out = tmp_path / "out"
    meta = prepare([str(corpus)], tok_file, out, PrepareOptions(val_fraction=0))
    before = np.array(load_tokens(out, "train", Tokenizer.load(tok_file)))
    moved = tmp_path / "elsewhere" / "shards"
    moved.parent.mkdir()
    shutil.move(out, moved)
    shutil.rmtree(tok_file.parent)

    path = shard_tokenizer_path(moved)
    assert path == moved / TOKENIZER_FILE
    tok = load_tokenizer(path)
    assert tok.fingerprint() == meta["tokenizer"]["fingerprint"]
    after = load_tokens(moved, "train", tok)
    assert after.tolist() == before.tolist()
    assert tok.decode(after.tolist()) == (TEXT * 20 + "<|endoftext|>" + TEXT.upper() * 20
                                          + "<|endoftext|>")


def test_meta_names_the_tokenizer_copy_relatively(tmp_path, corpus, tok_file):
    out = tmp_path / "out"
    prepare([str(corpus)], tok_file, out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["path"] == "tokenizer.json"
    assert not Path(meta["tokenizer"]["path"]).is_absolute()
    assert load_tokenizer(out / "tokenizer.json").fingerprint() == meta["tokenizer"][
        "fingerprint"]
    # A re-run finds the copy intact and rewrites nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare([str(corpus)], tok_file, out)["up_to_date"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_old_meta_with_an_absolute_tokenizer_path(tmp_path, corpus, tok_file):
    out = tmp_path / "out"
    prepare([str(corpus)], tok_file, out)
    # What prepare wrote before the copy: an absolute path and no tokenizer.json.
    meta = json.loads((out / "meta.json").read_text())
    meta["tokenizer"]["path"] = str(tok_file.resolve())
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "tokenizer.json").unlink()
    assert shard_tokenizer_path(out) == tok_file.resolve()

    # A re-run adds the copy without re-tokenizing.
    mtime = (out / "train.bin").stat().st_mtime_ns
    again = prepare([str(corpus)], tok_file, out)
    assert again["up_to_date"] is True and again["tokenizer"]["path"] == "tokenizer.json"
    assert read_meta(out)["tokenizer"]["path"] == "tokenizer.json"
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert shard_tokenizer_path(out) == out / "tokenizer.json"


def test_missing_tokenizer_is_a_clear_error(tmp_path, corpus, tok_file):
    out = tmp_path / "out"
    prepare([str(corpus)], tok_file, out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"re-run `scratchllm prepare` or set data.tokenizer"):
        shard_tokenizer_path(out)
    with pytest.raises(UserError, match="run `scratchllm prepare"):
        shard_tokenizer_path(tmp_path / "nothing-here")


def test_output_inside_a_source_dir_is_not_read_back(corpus, tok_file):
    out = corpus / "shards"  # meta.json and tokenizer.json are readable suffixes
    first = prepare([str(corpus)], tok_file, out, PrepareOptions(val_fraction=0))
    again = prepare([str(corpus)], tok_file, out, PrepareOptions(val_fraction=0))
    assert again["up_to_date"] is True and again["key"] == first["key"]
    read = [Path(f["path"]).name for s in again["sources"] for f in s["files"]]
    assert read == ["a.txt", "b.txt"]
    # Nothing under the output directory is a source, whatever it is called.
    (out / "notes.md").write_text("my notes on this run")
    (out / "old").mkdir()
    (out / "old" / "train.jsonl").write_text('{"text": "an older copy"}\n')
    third = prepare([str(corpus)], tok_file, out, PrepareOptions(val_fraction=0))
    assert third["up_to_date"] is True and third["key"] == first["key"]
    # The output directory as a source, or inside one given as a source: an error up front.
    for source in (out, out / "old", out / "notes.md"):
        with pytest.raises(UserError, match="is inside the output directory"):
            prepare([str(source)], tok_file, out)
    forced = prepare([str(corpus)], tok_file, out, PrepareOptions(val_fraction=0), force=True)
    assert forced["up_to_date"] is False and forced["splits"]["train"]["documents"] == 2


def test_loader_imports_the_shard_format_not_the_pipeline():
    import scratchllm.data.loader as loader

    tree = ast.parse(Path(loader.__file__).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for a in node.names}
    assert "scratchllm.data.shards" in modules
    assert not {m for m in modules if m and m.startswith("scratchllm.data.")} - {
        "scratchllm.data.shards"}
