"""The BPE tokenizer against its oracles: tiktoken, HF tokenizers, and a naive trainer."""

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.errors import UserError
from scratchllm.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    pretokenize,
)
from scratchllm.tokenizer.bytelevel import bytes_to_str
from scratchllm.tokenizer.pretokenize import count_chunks, split_chunks
from scratchllm.tokenizer.train import train_bpe
from tests.conftest import shared_corpora

ODD_STRINGS = [
    "", " ", "\n", "\r\n\r\n", "\t\x00\x01\x7f", "héllo wörld", "日本語のテキスト", "👩‍👩‍👧‍👦🙂",
    "e\u0301 n\u0303", "\ufffd", "  leading and trailing  ", "123456789 1,000,000.50",
    "I'M HERE, you're there, they'LL go", "<|endoftext|>", "<|endoftext", "a" * 500,
]


# --- patterns -------------------------------------------------------------------------------
# tiktoken's cl100k_base pattern (tiktoken_ext/openai_public.py), a rewrite of GPT-4's with
# possessive quantifiers; ours keeps the original form, which HF's Oniguruma reads the same way.
TIKTOKEN_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def test_patterns_split_as_tiktoken_does(data, tiktoken_gpt2):
    texts = [*ODD_STRINGS, *(text[:100_000] for text in shared_corpora(data).values())]
    for ours, theirs in [(GPT2_PATTERN, tiktoken_gpt2._pat_str), (GPT4_PATTERN, TIKTOKEN_CL100K)]:
        for text in texts:
            assert split_chunks(text, ours) == split_chunks(text, theirs)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_parallel_pieces_give_the_same_chunk_counts(pattern, shakespeare_small, monkeypatch):
    text = shakespeare_small[:300_000] + "\n\n\nÉtude  \n  über 12345\nend"
    expected = Counter(split_chunks(text, pattern))
    monkeypatch.setattr(pretokenize, "PIECE_CHARS", 10_000)
    monkeypatch.setattr(pretokenize, "PARALLEL_MIN_CHARS", 1)
    assert count_chunks([text], pattern, workers=1) == expected
    assert count_chunks([text], pattern, workers=2) == expected
    assert "".join(split_chunks(text, pattern)) == text


# --- training -------------------------------------------------------------------------------
def naive_train(chunk_counts: dict[str, int], vocab_size: int):
    """minbpe's loop: recount every pair after every merge (the slow, obvious oracle)."""
    words = {chunk: list(chunk.encode()) for chunk in chunk_counts}
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        pairs = Counter()
        for chunk, word in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += chunk_counts[chunk]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        new_id = vocab.index(merged) if merged in vocab else len(vocab)
        if new_id == len(vocab):
            vocab.append(merged)
        merges.append(best)
        for chunk, word in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[chunk] = out
    return vocab, merges


@pytest.mark.parametrize("text_name", ["the-verdict.txt", "SMSSpamCollection"])
def test_incremental_training_equals_naive_training(data, text_name):
    text = shared_corpora(data)[text_name][:30_000] + " aaaa aaaaa abab ababab"
    counts = count_chunks([text], workers=1)
    assert train_bpe(counts, 256 + 150) == naive_train(counts, 256 + 150)


def test_training_is_deterministic_and_order_free(shakespeare_small):
    docs = shakespeare_small[:200_000].split("\n\n")
    first = Tokenizer.train(docs, vocab_size=600)
    random.Random(0).shuffle(docs)
    second = Tokenizer.train(docs, vocab_size=600)
    assert first.vocab == second.vocab and first.merges == second.merges


def test_vocab_size_counts_specials(trained_tok):
    assert trained_tok.vocab_size == 1024
    names = list(trained_tok.special_tokens)
    assert names == ["<|endoftext|>", "<|pad|>", "<|unk|>", "<|user|>"]
    assert sorted(trained_tok.special_tokens.values()) == list(range(1020, 1024))
    assert len(trained_tok.vocab) == 1020 and trained_tok.eot_id == 1020


# --- encode / decode --------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_string(trained_tok, gpt2_tok, text):
    for tok in (trained_tok, gpt2_tok):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_reference(text) == ids


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_round_trip_odd_strings(trained_tok, gpt2_tok, text):
    for tok in (trained_tok, gpt2_tok):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1023), max_size=40))
def test_decoding_any_ids_never_raises(trained_tok, ids):
    # The bytes are the tokens' own, one after another (specials as their names).
    names = {i: name.encode() for name, i in trained_tok.special_tokens.items()}
    raw = b"".join(names[i] if i in names else trained_tok.vocab[i] for i in ids)
    assert trained_tok.decode_bytes(ids) == raw
    text = trained_tok.decode(ids)
    assert text == raw.decode("utf-8", errors="replace")
    assert "".join(trained_tok.decode_stream(ids)) == text
    # Decoded text encodes back to ids that decode to the same text (the ids may differ:
    # random ids are seldom the encoder's choice).
    assert trained_tok.decode(trained_tok.encode(text, allowed_special="all")) == text


def test_incomplete_utf8_becomes_replacement_char(trained_tok):
    # tinyshakespeare is ASCII: non-ASCII characters are their byte tokens, ids = byte values.
    ids = trained_tok.encode("é")
    euro = trained_tok.encode("€")
    assert ids == [0xC3, 0xA9] and euro == [0xE2, 0x82, 0xAC]
    assert trained_tok.decode(euro[:1]) == "\ufffd"
    assert trained_tok.decode(euro[:2]) == "\ufffd"  # one replacement for a cut sequence
    assert trained_tok.decode(euro[1:]) == "\ufffd\ufffd"  # two stray continuation bytes
    assert trained_tok.decode(euro[:2] + ids) == "\ufffdé"
    assert trained_tok.decode(ids + euro) == "é€"
    assert list(trained_tok.decode_stream(trained_tok.encode("日本🙂"))) == ["日", "本", "🙂"]


@pytest.mark.parametrize("bad", [[1024], [-1], [5, 99999]])
def test_out_of_range_id_is_a_clear_error(trained_tok, bad):
    with pytest.raises(UserError, match="out of range"):
        trained_tok.decode(bad)


def test_special_token_rules(trained_tok):
    text = "a<|endoftext|>b<|user|>c"
    plain = trained_tok.encode(text)
    assert trained_tok.eot_id not in plain and trained_tok.decode(plain) == text
    user = trained_tok.special_tokens["<|user|>"]
    assert trained_tok.encode(text, allowed_special="all") == [
        *trained_tok.encode("a"), trained_tok.eot_id, *trained_tok.encode("b"), user,
        *trained_tok.encode("c"),
    ]
    only_user = trained_tok.encode(text, allowed_special={"<|user|>"})
    assert user in only_user and trained_tok.eot_id not in only_user
    for allowed in ((), "all", {"<|user|>"}):
        assert trained_tok.encode_reference(text, allowed) == trained_tok.encode(text, allowed)
    with pytest.raises(UserError, match="unknown special"):
        trained_tok.encode(text, allowed_special={"<|nope|>"})


def test_encode_batch_matches_encode(trained_tok):
    texts = ["To be", "or not <|endoftext|> to be", ""]
    assert trained_tok.encode_batch(texts) == [trained_tok.encode(t) for t in texts]
    assert trained_tok.encode_batch(texts, "all") == [trained_tok.encode(t, "all") for t in texts]


# --- oracles ----------------------------------------------------------------------------------
def test_gpt2_ids_equal_tiktoken_on_shared_corpora(data, gpt2_tok, tiktoken_gpt2):
    assert gpt2_tok.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2_tok.ranks == tiktoken_gpt2._mergeable_ranks
    corpora = shared_corpora(data)
    for name in ["input.txt", *[n for n in corpora if n.startswith("pg")]]:
        assert gpt2_tok.encode(corpora[name]) == tiktoken_gpt2.encode_ordinary(corpora[name]), name
    text = "Hello<|endoftext|>world"
    assert gpt2_tok.encode(text, "all") == tiktoken_gpt2.encode(text, allowed_special="all")


def test_fast_path_equals_reference_on_every_shared_corpus(data, gpt2_tok, trained_tok):
    for name, text in shared_corpora(data).items():
        for tok in (gpt2_tok, trained_tok):
            assert tok.encode_reference(text) == tok.encode(text), name


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_hf_export_encodes_identically(tmp_path, data, shakespeare_small, pattern):
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer.train([shakespeare_small], vocab_size=2048, pattern=pattern)
    tok.export_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    corpora = shared_corpora(data)
    texts = [*ODD_STRINGS[:-2], corpora["the-verdict.txt"], corpora["SMSSpamCollection"],
             corpora["tatoeba.fra-eng.fra"], corpora["pg11-alice-s-adventures-in-wonderland.txt"]]
    texts.append("Once<|endoftext|>upon<|pad|>")
    for text in texts:
        # HF always recognises added special tokens: tiktoken's allowed_special="all".
        ids = tok.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids, text[:40]
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_gpt2_hf_export_matches_tiktoken(tmp_path, data, gpt2_tok, tiktoken_gpt2):
    from tokenizers import Tokenizer as HFTokenizer

    gpt2_tok.export_hf(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = shared_corpora(data)["the-verdict.txt"] + "".join(ODD_STRINGS[:-2])
    assert hf.encode(text).ids == tiktoken_gpt2.encode(text, allowed_special="all")


# --- files ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, trained_tok):
    path = tmp_path / "tok.json"
    trained_tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "scratchllm-tokenizer" and data["version"] == 1
    assert data["vocab"][32] == "Ġ"  # byte-level stand-ins keep the file readable
    loaded = Tokenizer.load(path)
    assert loaded.vocab == trained_tok.vocab and loaded.merges == trained_tok.merges
    assert loaded.special_tokens == trained_tok.special_tokens
    assert loaded.pattern == trained_tok.pattern == GPT4_PATTERN
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temp file left behind


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer.train(["hello world"])
    assert tok.vocab_size == 8 + 3
    assert tok.decode(tok.encode("hello")) == "hello"
    ids = tok.encode("help!")
    assert ids[3:] == [tok.unk_id, tok.unk_id]
    assert tok.decode(ids) == "hel<|unk|><|unk|>"
    assert tok.encode("he<|endoftext|>", "all")[-1] == tok.eot_id
    tok.save(tmp_path / "c.json")
    loaded = load_tokenizer(tmp_path / "c.json")
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    with pytest.raises(UserError, match="holds a 'char' tokenizer"):
        Tokenizer.load(tmp_path / "c.json")


# --- bad input --------------------------------------------------------------------------------
def test_vocab_size_too_small():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=258)


def test_empty_corpus():
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train([""], vocab_size=300)
    with pytest.raises(UserError, match="empty"):
        CharTokenizer.train([])


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not JSON"),
        ('{"format": "other"}', "not a scratchllm tokenizer"),
        ('{"format": "scratchllm-tokenizer", "version": 99, "type": "bpe"}', "version 99"),
        ('{"format": "scratchllm-tokenizer", "version": 1, "type": "wordpiece"}', "unknown"),
        ('{"format": "scratchllm-tokenizer", "version": 1, "type": "bpe", "vocab": []}',
         "corrupt"),
    ],
)
def test_corrupt_tokenizer_files(tmp_path, content, match):
    path = tmp_path / "tok.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_tokenizer(path)


def bpe_file(tmp_path, vocab: list[bytes], merges: list[tuple[int, int]]):
    """A tokenizer file with this vocabulary and these merges (no checks on the way)."""
    data = {"format": "scratchllm-tokenizer", "version": 1, "type": "bpe",
            "pattern": GPT4_PATTERN, "special_tokens": {"<|endoftext|>": len(vocab)},
            "vocab": [bytes_to_str(t) for t in vocab], "merges": [list(m) for m in merges]}
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(data))
    return path


BYTES = [bytes([b]) for b in range(256)]
A, B, C = ord("a"), ord("b"), ord("c")


@pytest.mark.parametrize(
    "vocab, merges, match",
    [
        # byte "q" replaced by a longer token: tiktoken used to panic on any "q" in the text
        ([*BYTES[:ord("q")], b"qu", *BYTES[ord("q") + 1:]], [],
         r"lacks 1 of the 256 single-byte tokens \(0x71\)"),
        (BYTES[:200], [], r"lacks 56 of the 256 single-byte tokens \(0xc8, 0xc9, .*, \.\.\.\)"),
        ([*BYTES, b"ab", b"ab"], [(A, B)], r"duplicate tokens: 256 and 257 are both b'ab'"),
        # "abc" (256) is made from "ab", ranked after it: ranks are not the merge order
        ([*BYTES, b"abc", b"ab"], [(A, B), (257, C)], r"token 256 \(b'abc'\) is not made by "
         "merging two tokens ranked before it"),
        ([*BYTES, b"xy"], [], r"token 256 \(b'xy'\) is not made by merging"),
        ([*BYTES, b"ab"], [(A, B), (A, C)], r"merge 1 \(97, 99\) makes no token"),
        ([*BYTES, b"ab"], [(A, 300)], r"merge 0 \(97, 300\) names an id outside the vocabulary"),
    ],
)
def test_inconsistent_vocabulary_is_refused_at_load(tmp_path, vocab, merges, match):
    path = bpe_file(tmp_path, vocab, merges)
    with pytest.raises(UserError, match=match) as error:
        load_tokenizer(path)
    assert "\n" not in str(error.value) and "re-create it" in str(error.value)


def test_consistent_vocabularies_load(tmp_path, gpt2_tok):
    tok = load_tokenizer(bpe_file(tmp_path, [*BYTES, b"ab", b"abc"], [(A, B), (256, C)]))
    assert tok.encode("abc ab") == [257, 32, 256]
    # a second merge reaching a token already made (as training can record) is fine
    tok = load_tokenizer(bpe_file(tmp_path, [*BYTES, b"ab", b"bc", b"abc"],
                                  [(A, B), (B, C), (256, C), (A, 257)]))
    assert tok.encode("abc") == [258]
    assert len(gpt2_tok.vocab) == 50256  # GPT-2's files pass the same checks


def test_missing_byte_token_is_one_error_line_not_a_rust_panic(tmp_path, capsys):
    from scratchllm.cli import main

    path = bpe_file(tmp_path, [*BYTES[:ord("q")], b"qu", *BYTES[ord("q") + 1:]], [])
    assert main(["tokenizer", "encode", "--tokenizer", str(path), "--text", "Iraq"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert "single-byte tokens" in err and "panicked" not in err


def test_tiktoken_failures_are_user_errors():
    # tiktoken's regex engine gives up on a million spaces (ValueError, or a Rust panic from
    # encode_ordinary) and on a pattern that backtracks too much (a panic): never a
    # BaseException with a Rust backtrace, always a UserError.
    plain = Tokenizer(BYTES, [])
    backtracking = Tokenizer(BYTES, [], pattern=r"(?:a(?=a)|a)+b")
    for tok, text in ((plain, " " * 1_000_000), (backtracking, "a" * 5000)):
        for encode in (tok.encode, tok.encode_ordinary, tok.encode_array,
                       lambda t, tok=tok: tok.encode_batch([t])):
            with pytest.raises(UserError, match="tiktoken failed to encode the text"):
                encode(text)
    with pytest.raises(UserError, match="tiktoken cannot use the tokenizer's pattern"):
        Tokenizer(BYTES, [], pattern=r"(?P<x").encode("a")


def test_truncated_tokenizer_file(tmp_path, trained_tok):
    path = tmp_path / "tok.json"
    trained_tok.save(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="not JSON"):
        load_tokenizer(path)


def test_bad_gpt2_files(tmp_path):
    (tmp_path / "e.json").write_text("[]")
    (tmp_path / "v.bpe").write_text("#version: 0.2\nx y\n")
    with pytest.raises(UserError, match="not GPT-2 tokenizer files"):
        Tokenizer.from_gpt2_files(tmp_path / "e.json", tmp_path / "v.bpe")
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_gpt2_files(tmp_path / "missing.json", tmp_path / "v.bpe")


# --- structure --------------------------------------------------------------------------------
def tokenizer_import_graph() -> dict[str, set[str]]:
    """Module -> the scratchllm.tokenizer modules it imports anywhere (functions included)."""
    import ast
    from pathlib import Path

    import scratchllm.tokenizer as package

    root = Path(package.__file__).parent
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[:2] == ["scratchllm", "tokenizer"]:
                    # `from scratchllm.tokenizer import x` runs __init__, which imports all
                    deps.add(parts[2] if len(parts) > 2 else "__init__")
                    deps |= {a.name for a in node.names if a.name in names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[:2] == ["scratchllm", "tokenizer"]:
                        deps.add(parts[2] if len(parts) > 2 else "__init__")
        graph[path.stem] = deps - {path.stem}
    return graph


def test_tokenizer_modules_import_no_cycle():
    graph = tokenizer_import_graph()
    assert "bpe" in graph["load"] and "char" in graph["load"]
    assert not graph["base"] & {"bpe", "char", "load", "__init__"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and reaches(dep, target, seen | {dep})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_base_load_needs_a_concrete_class(tmp_path):
    from scratchllm.tokenizer import BaseTokenizer

    CharTokenizer.train(["abc"]).save(tmp_path / "c.json")
    with pytest.raises(TypeError, match="load_tokenizer"):
        BaseTokenizer.load(tmp_path / "c.json")
    assert isinstance(CharTokenizer.load(tmp_path / "c.json"), CharTokenizer)
