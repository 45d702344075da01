"""Tokenizer benchmark: training time, encoding throughput and compression vs named peers.

Peers, measured in the same run: HF `tokenizers` (ByteLevel BPE trainer, same pattern and
vocab size) for training and compression; tiktoken's GPT-2 encoding and HF `tokenizers` for
encoding throughput (one thread each). Run: python bench/tokenizer.py [--quick]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import data_dir, machine, median_time, table, tiktoken_gpt2  # noqa: E402
from scratchllm.data import shakespeare_plays  # noqa: E402
from scratchllm.tokenizer import DEFAULT_SPECIALS, Tokenizer, compression  # noqa: E402
from scratchllm.tokenizer.pretokenize import resolve_pattern  # noqa: E402


def hf_train(texts: list[str], vocab_size: int, pattern: str):
    """HF tokenizers' byte-level BPE trainer with the same pattern, vocab size and specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(resolve_pattern(pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(DEFAULT_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip vocab 32768")
    args = parser.parse_args()
    import tiktoken
    import tokenizers

    print(f"machine: {machine()}")
    print(f"tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}\n")

    plays = list(shakespeare_plays().values())
    corpus_mb = sum(len(p.encode()) for p in plays) / 1e6
    repeats = 1 if args.quick else 3

    # Training time on the whole default corpus.
    rows = []
    for vocab_size in [4096] if args.quick else [4096, 32768]:
        ours = median_time(lambda v=vocab_size: Tokenizer.train(plays, v), repeats, warmup=0)
        hf = median_time(lambda v=vocab_size: hf_train(plays, v, "gpt4"), repeats, warmup=0)
        rows.append([vocab_size, ours, hf, ours / hf])
    print(f"training on the default corpus ({corpus_mb:.2f} MB, {len(plays)} plays), "
          f"median of {repeats}, seconds")
    print(table(["vocab", "scratchllm s", "HF tokenizers s", "ours/HF (target <= 3)"], rows))

    # Compression on held-out plays: train on the other plays.
    held_out, train = plays[::8], [p for i, p in enumerate(plays) if i % 8]
    rows = []
    for vocab_size in (4096, 32768):
        ours = Tokenizer.train(train, vocab_size)
        hf = hf_train(train, vocab_size, "gpt4")
        hf_tokens = sum(len(hf.encode(p, add_special_tokens=False).ids) for p in held_out)
        hf_bpt = sum(len(p.encode()) for p in held_out) / hf_tokens
        ours_bpt = compression(ours, held_out)
        rows.append([vocab_size, ours_bpt, hf_bpt, ours_bpt / hf_bpt])
    print(f"\ncompression on {len(held_out)} held-out plays, bytes per token (higher is better)")
    print(table(["vocab", "scratchllm", "HF tokenizers", "ours/HF (target >= 0.99)"], rows))

    # Encoding throughput on the Gutenberg books, one thread each.
    books = data_dir() / "gutenberg-books"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(books.glob("pg*.txt")))
    mb = len(text.encode()) / 1e6
    gpt2_files = (data_dir() / "gpt2-tokenizer" / "encoder.json",
                  data_dir() / "gpt2-tokenizer" / "vocab.bpe")
    ours_gpt2 = Tokenizer.from_gpt2_files(*gpt2_files)
    ours_4k = Tokenizer.train(plays, 4096)
    tik = tiktoken_gpt2(*gpt2_files, Path(tempfile.mkdtemp(prefix="tiktoken-cache-")))
    with tempfile.TemporaryDirectory() as tmp:
        ours_gpt2.export_hf(Path(tmp) / "tokenizer.json")
        from tokenizers import Tokenizer as HFTokenizer

        hf_gpt2 = HFTokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    assert ours_gpt2.encode_ordinary(text) == tik.encode_ordinary(text)
    enc_repeats = 3 if args.quick else 5
    t_tik = median_time(lambda: tik.encode_ordinary(text), enc_repeats)
    candidates = {
        "tiktoken gpt2": t_tik,
        "scratchllm gpt2 (fast path)": median_time(
            lambda: ours_gpt2.encode_ordinary(text), enc_repeats),
        "scratchllm trained 4096 (fast path)": median_time(
            lambda: ours_4k.encode_ordinary(text), enc_repeats),
        "HF tokenizers gpt2": median_time(
            lambda: hf_gpt2.encode(text, add_special_tokens=False), enc_repeats),
    }
    rows = [[name, mb / t, t_tik / t] for name, t in candidates.items()]
    print(f"\nencoding {mb:.2f} MB of Gutenberg books, one thread, median of {enc_repeats}")
    print(table(["encoder", "MB/s", "vs tiktoken (target >= 0.9)"], rows))


if __name__ == "__main__":
    main()
