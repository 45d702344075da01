"""The data pipeline: sources, the registry, downloads, prepare, and the loaders."""

import bz2
import gzip
import hashlib
import http.server
import json
import sys
import threading
import types

import numpy as np
import pytest

from scratchllm.data import prepare as prepare_module
from scratchllm.data import registry
from scratchllm.data.clean import gutenberg_cut, normalize_newlines
from scratchllm.data.download import download
from scratchllm.data.loader import (
    RandomWindows,
    SequentialWindows,
    SlidingWindowDataset,
    load_tokens,
    text_dataloader,
)
from scratchllm.data.prepare import PrepareOptions, prepare
from scratchllm.data.shards import check_shards, read_meta
from scratchllm.data.sources import (
    SEGMENT_CHARS,
    SourceOptions,
    iter_segments,
    sample_texts,
    texts_from_source,
)
from scratchllm.errors import UserError
from scratchllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, shakespeare_small):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    Tokenizer.train([shakespeare_small], vocab_size=600).save(path)
    return path


@pytest.fixture(autouse=True)
def mirror(monkeypatch, data, tmp_path):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))


def decode_file(tok, path, dtype="uint16"):
    return tok.decode(np.fromfile(path, dtype=dtype).tolist())


# --- sources ----------------------------------------------------------------------------------
def test_every_local_source_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text\r\nwith CRLF")
    (root / "sub" / "b.md").write_text("# markdown")
    (root / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two", "x": 1}\n')
    (root / "d.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}]))
    pq.write_table(pa.table({"text": ["pq one", "pq two"], "n": [1, 2]}), root / "e.parquet")
    (root / "f.txt.gz").write_bytes(gzip.compress(b"gzipped"))
    (root / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zstd"}\n'))
    (root / "h.txt.bz2").write_bytes(bz2.compress(b"bzipped"))
    (root / "skip.bin").write_bytes(b"\x00\x01")  # not a readable suffix: ignored
    texts = list(texts_from_source(str(root)))
    assert texts == ["plain text\r\nwith CRLF", "line one", "line two", "json one", "json two",
                     "pq one", "pq two", "gzipped", "zstd", "bzipped", "# markdown"]
    only_txt = SourceOptions(include=["*.txt*"], exclude=["h.*"])
    assert list(texts_from_source(str(root), only_txt)) == ["plain text\r\nwith CRLF", "gzipped"]


def test_text_field_choice(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"body": "hello"}\n')
    options = SourceOptions(text_field="body")
    assert list(texts_from_source(str(tmp_path / "r.jsonl"), options)) == ["hello"]
    with pytest.raises(UserError, match=r"r.jsonl:1: no field 'text' \(it has 'body'\)"):
        list(texts_from_source(str(tmp_path / "r.jsonl")))


def test_long_documents_are_segmented_without_changing_tokens(tmp_path, data):
    text = normalize_newlines((data / "tinyshakespeare" / "input.txt").read_text())
    segments = list(iter_segments(str(data / "tinyshakespeare" / "input.txt")))
    assert len(segments) > 10 and [s.last for s in segments].count(True) == 1
    assert "".join(s.text for s in segments) == text
    tok = Tokenizer.train([text[:100_000]], vocab_size=400)
    assert sum((tok.encode(s.text) for s in segments), []) == tok.encode(text)


# --- registry and downloads ---------------------------------------------------------------------
EXPECTED_DOCS = {"tinyshakespeare": 1, "the-verdict": 1, "gutenberg": 13, "sms-spam": 5574,
                 "instruction-data": 1100, "preference-data": 1100, "gsm8k": 7473,
                 "tatoeba-fra-eng": 1000, "tatoeba-deu-eng": 1000, "tico19-en-fr": 3071,
                 "shakespeare": 38}


@pytest.mark.parametrize("name", list(registry.DATASETS))
def test_registry_against_the_mirror(name):
    docs = list(registry.documents(name))
    assert len(docs) == EXPECTED_DOCS[name]
    assert all(doc.strip() and "\r" not in doc for doc in docs)
    if name == "gutenberg":
        assert not any("PROJECT GUTENBERG EBOOK" in d or "Gutenberg License" in d for d in docs)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError, match="known datasets: shakespeare, tinyshakespeare"):
        registry.get("tiny-shakespeare")


def test_mirror_missing_or_wrong_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="missing from the mirror"):
        registry.files("the-verdict")
    (tmp_path / "the-verdict").mkdir()
    (tmp_path / "the-verdict" / "the-verdict.txt").write_text("x" * 20479)
    with pytest.raises(UserError, match="does not match its sha256"):
        registry.files("the-verdict")


class Server:
    """A local HTTP server whose answers per path are scripted by the test."""

    def __init__(self):
        self.routes: dict[str, list] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                script = server.routes[self.path]
                kind, body = script.pop(0) if len(script) > 1 else script[0]
                if kind == "error":
                    self.send_error(500)
                    return
                self.send_response(200)
                declared = len(body) * 2 if kind == "truncated" else len(body)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


BODY = b"some corpus text\n" * 1000
DIGEST = hashlib.sha256(BODY).hexdigest()


def cache_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_download_success_and_cache(server, tmp_path):
    server.routes["/ok"] = [("ok", BODY)]
    dest = tmp_path / "cache" / "x" / "ok.txt"
    assert download(server.url("/ok"), dest, DIGEST, len(BODY)).read_bytes() == BODY
    download(server.url("/ok"), dest, DIGEST, len(BODY))
    assert server.hits["/ok"] == 1  # the verified copy is reused


def test_download_checksum_mismatch_caches_nothing(server, tmp_path):
    server.routes["/bad"] = [("ok", BODY + b"tampered")]
    with pytest.raises(UserError, match="rejected"):
        download(server.url("/bad"), tmp_path / "cache" / "bad.txt", DIGEST, backoff=0)
    assert cache_files(tmp_path / "cache") == []


def test_download_interrupted_leaves_no_partial_file(server, tmp_path):
    server.routes["/cut"] = [("truncated", BODY)]
    with pytest.raises(UserError, match="could not download"):
        download(server.url("/cut"), tmp_path / "cache" / "cut.txt", DIGEST, backoff=0,
                 timeout=5)
    assert cache_files(tmp_path / "cache") == []
    assert server.hits["/cut"] == 3  # retried


def test_download_server_error_then_retry_succeeds(server, tmp_path):
    server.routes["/flaky"] = [("error", b""), ("ok", BODY)]
    dest = tmp_path / "cache" / "flaky.txt"
    assert download(server.url("/flaky"), dest, DIGEST, backoff=0).read_bytes() == BODY
    assert server.hits["/flaky"] == 2
    server.routes["/down"] = [("error", b"")]
    with pytest.raises(UserError, match="HTTP Error 500|Internal Server Error"):
        download(server.url("/down"), tmp_path / "cache" / "down.txt", DIGEST, backoff=0)


def test_offline_without_mirror_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("SCRATCHLLM_DATA_DIR")
    file = registry.RemoteFile("http://127.0.0.1:9/the-verdict.txt", "v/the-verdict.txt", 3,
                               DIGEST)
    with pytest.raises(UserError, match="http://127.0.0.1:9/the-verdict.txt.*SCRATCHLLM_DATA_DIR"):
        download(file.url, tmp_path / "cache" / file.path, file.sha256, retries=1)


class FakeDatasets:
    """A stand-in `datasets` module: records how it is called, streams records lazily.

    `revision` is the dataset's current commit, as `load_dataset_builder(...).hash` exposes
    it; None stands for a `datasets` without `load_dataset_builder`.
    """

    def __init__(self, records, revision=None):
        self.records, self.revision, self.calls, self.read = records, revision, [], 0
        if revision is not None:
            self.load_dataset_builder = lambda name, config: types.SimpleNamespace(
                hash=self.revision)

    def load_dataset(self, name, config, split, streaming, **pinned):
        self.calls.append((name, config, split, streaming, *pinned.values()))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return self._stream(list(self.records))

    def _stream(self, records):
        for record in records:
            self.read += 1
            yield record


def test_hf_source_streams_the_chosen_split_and_field(tmp_path, tok_path, monkeypatch):
    # No network here: a stand-in `datasets` module records how it is called.
    records = [{"text": "First record.\n", "id": 1}, {"text": "Second one.", "id": 2}]
    fake = FakeDatasets(records)
    calls = fake.calls
    monkeypatch.setitem(sys.modules, "datasets", fake)
    segments = list(iter_segments("hf:org/set:en@validation", SourceOptions()))
    assert calls == [("org/set", "en", "validation", True)]
    assert [seg.text for seg in segments] == [r["text"] for r in records]
    meta = prepare(["hf:org/set"], tok_path, tmp_path / "out", PrepareOptions(val_fraction=0))
    assert calls[-1] == ("org/set", None, "train", True) and meta["splits"]["train"][
        "documents"] == 2
    assert meta["sources"][0]["revision"] is None  # this `datasets` exposes none
    expected = "".join(r["text"] + "<|endoftext|>" for r in records)
    assert decode_file(Tokenizer.load(tok_path), tmp_path / "out" / "train.bin") == expected
    with pytest.raises(UserError, match="record 0: no field 'body'.*--text-field"):
        list(iter_segments("hf:org/set", SourceOptions(text_field="body")))
    with pytest.raises(UserError, match="cannot open HF dataset 'missing/set'"):
        list(iter_segments("hf:missing/set", SourceOptions()))


def test_hf_revision_is_in_the_prepare_key(tmp_path, tok_path, monkeypatch):
    fake = FakeDatasets([{"text": "old text"}], revision="r1")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out, options = tmp_path / "out", PrepareOptions(val_fraction=0)
    meta = prepare(["hf:org/set:en"], tok_path, out, options)
    assert meta["sources"][0]["revision"] == "r1"
    assert fake.calls == [("org/set", "en", "train", True, "r1")]  # streamed at that revision
    assert prepare(["hf:org/set:en"], tok_path, out, options)["up_to_date"] is True
    fake.revision, fake.records = "r2", [{"text": "new text"}]  # the dataset changed remotely
    again = prepare(["hf:org/set:en"], tok_path, out, options)
    assert again["up_to_date"] is False and again["sources"][0]["revision"] == "r2"
    assert fake.calls[-1] == ("org/set", "en", "train", True, "r2")
    tok = Tokenizer.load(tok_path)
    assert decode_file(tok, out / "train.bin") == "new text<|endoftext|>"


# --- tokenizer training's character budget --------------------------------------------------
def test_tokenizer_train_samples_a_budget_across_an_hf_stream(tmp_path, monkeypatch, capsys):
    from scratchllm.cli import main

    records = [{"text": f"record {i:03d} " + "word " * 18} for i in range(300)]  # 101 chars
    fake = FakeDatasets(records)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    seen = []
    train = Tokenizer.train.__func__

    def recording_train(cls, texts, *args, **kwargs):
        seen.extend(texts)
        return train(cls, seen, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "train", classmethod(recording_train))
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--data", "hf:org/big", "--max-chars", "3000",
                 "--vocab-size", "270", "--out", str(out)]) == 0
    assert out.is_file() and fake.read == 300  # the whole stream was read, once
    assert 2700 < sum(map(len, seen)) <= 3000  # about 29 of the 300 records
    taken = [int(text.split()[1]) for text in seen]
    assert taken == sorted(taken) and len(set(taken)) == len(seen)
    assert min(sum(i // 100 == third for i in taken) for third in range(3)) >= 4  # spread
    assert "sampled evenly from 30,300 characters" in capsys.readouterr().err


def test_budget_sampling_of_local_files(tmp_path, data):
    # Within the budget: the documents themselves, unchanged, long ones whole.
    sources = [str(data / "the-verdict" / "the-verdict.txt"), "gutenberg"]
    everything = [t for source in sources for t in texts_from_source(source)]
    texts, total = sample_texts(sources, max_chars=10**9)
    assert texts == everything and total == sum(map(len, everything))
    # Over it: at most the budget, from all over the corpus, whole pieces in stream order.
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(f"file{i:02d} " * 100)  # 700 characters
    texts, total = sample_texts([str(corpus)], max_chars=7_000)
    assert total == 28_000 and 6_000 < sum(map(len, texts)) <= 7_000
    files = [int(t[4:6]) for t in texts]
    assert all(t == f"file{i:02d} " * 100 for t, i in zip(texts, files, strict=True))
    assert files == sorted(files) and min(files) < 10 and max(files) >= 30
    assert sample_texts([str(corpus)], max_chars=7_000) == (texts, total)  # deterministic
    # A record longer than a segment is cut like a document, so it can be sampled in part.
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "word " * 20_000}) + "\n")
    texts, total = sample_texts([str(tmp_path / "long.jsonl")], max_chars=30_000)
    assert total == 100_000 and 20_000 < sum(map(len, texts)) <= 30_000
    assert all(len(t) <= 2 * SEGMENT_CHARS or "word word" in t for t in texts)


# --- prepare ----------------------------------------------------------------------------------
def test_prepare_round_trip_and_meta(tmp_path, tok_path, data):
    tok = Tokenizer.load(tok_path)
    meta = prepare(["gutenberg", "the-verdict"], tok_path, tmp_path / "out",
                   PrepareOptions(val_fraction=0))
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["tokens"] == 0
    docs = [*registry.documents("gutenberg"), *registry.documents("the-verdict")]
    assert meta["splits"]["train"]["documents"] == 14
    expected = "".join(doc + "<|endoftext|>" for doc in docs)
    assert decode_file(tok, tmp_path / "out" / "train.bin") == expected
    assert [s["source"] for s in meta["sources"]] == ["gutenberg", "the-verdict"]
    assert meta["sources"][1]["files"][0]["sha256"].startswith("b41e41a6")
    for split in meta["splits"].values():
        digest = hashlib.sha256((tmp_path / "out" / split["file"]).read_bytes()).hexdigest()
        assert split["sha256"] == digest


def test_prepare_strips_gutenberg_from_local_files(tmp_path, tok_path, data):
    tok = Tokenizer.load(tok_path)
    book = data / "gutenberg-books" / "pg84-frankenstein.txt"
    prepare([str(book)], tok_path, tmp_path / "out", PrepareOptions(val_fraction=0))
    text, _ = gutenberg_cut(normalize_newlines(book.read_text()))
    assert decode_file(tok, tmp_path / "out" / "train.bin") == text.lstrip() + "<|endoftext|>"


def test_split_is_deterministic_and_spread(tmp_path, tok_path):
    a = prepare(["sms-spam"], tok_path, tmp_path / "a", PrepareOptions(val_fraction=0.1))
    prepare(["sms-spam"], tok_path, tmp_path / "b", PrepareOptions(val_fraction=0.1))
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (
            tmp_path / "b" / f"{split}.bin").read_bytes()
    assert a["splits"]["val"]["documents"] == 557  # round(5574 * 0.1)
    assert a["splits"]["train"]["documents"] + 557 == 5574
    c = prepare(["sms-spam"], tok_path, tmp_path / "c", PrepareOptions(val_docs=10))
    assert c["splits"]["val"]["documents"] == 10


def test_segments_go_to_their_split(tmp_path, tok_path, data):
    path = data / "tinyshakespeare" / "input.txt"
    prepare([str(path)], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0.3))
    segments = [normalize_newlines(s.text) for s in iter_segments(str(path))]
    val = [int((i + 1) * 0.3 + 0.5) > int(i * 0.3 + 0.5) for i in range(len(segments))]
    tok = Tokenizer.load(tok_path)
    for split, to_val in (("train", False), ("val", True)):
        text = "".join(s for s, v in zip(segments, val, strict=True) if v == to_val)
        end = "<|endoftext|>" if val[-1] == to_val else ""
        assert decode_file(tok, tmp_path / "o" / f"{split}.bin") == text + end


def test_units_encoded_in_one_call_match_one_by_one(tok_path, data):
    # prepare encodes a group of units in one tiktoken call, with <|endoftext|> between them
    from scratchllm.data.prepare import _encode_separated

    tok = Tokenizer.load(tok_path)
    text = (data / "tinyshakespeare" / "input.txt").read_text()[:20_000]
    texts = [text[i:i + 997] for i in range(0, len(text), 997)] + ["", " x", "a <|pad|> b\n"]
    for case in (texts, [*texts, "text holding <|endoftext|> itself"]):  # one call; one by one
        expected = np.array([i for t in case for i in [*tok.encode(t), tok.eot_id]])
        ids, seps = _encode_separated(tok, case)
        assert ids.tolist() == expected.tolist()
        assert seps.tolist() == np.flatnonzero(expected == tok.eot_id).tolist()


def test_special_token_text_in_documents_stays_text(tmp_path, tok_path):
    docs = ["a <|endoftext|> b", "c <|pad|> d", "plain"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare([str(tmp_path / "d.jsonl")], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0))
    tok = Tokenizer.load(tok_path)
    ids = np.fromfile(tmp_path / "o" / "train.bin", dtype=np.uint16)
    assert (ids == tok.eot_id).sum() == len(docs)
    assert tok.decode(ids.tolist()) == "".join(d + "<|endoftext|>" for d in docs)


def test_single_file_corpus_gets_a_val_split(tmp_path, tok_path):
    meta = prepare(["tinyshakespeare"], tok_path, tmp_path / "o")
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 0.05 < meta["splits"]["val"]["tokens"] / total < 0.2


def test_rerun_is_a_noop_and_changes_are_detected(tmp_path, tok_path, shakespeare_small):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first document " * 100)
    (src / "b.txt").write_text("second document " * 100)
    out = tmp_path / "out"
    first = prepare([str(src)], tok_path, out)
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare([str(src)], tok_path, out)["up_to_date"] is True
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    (src / "b.txt").write_text("changed document " * 100)
    assert prepare([str(src)], tok_path, out)["up_to_date"] is False
    other_tok = tmp_path / "other.json"
    Tokenizer.train([shakespeare_small[:50_000]], vocab_size=300).save(other_tok)
    again = prepare([str(src)], other_tok, out)
    assert again["up_to_date"] is False and again["key"] != first["key"]
    with pytest.raises(UserError, match="different tokenizer"):
        check_shards(out, Tokenizer.load(tok_path))


def test_shard_meta_mismatch_is_detected(tmp_path, tok_path):
    prepare(["the-verdict"], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0))
    train = tmp_path / "o" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(UserError, match="do not match meta.json"):
        load_tokens(tmp_path / "o", "train")
    (tmp_path / "o" / "meta.json").unlink()
    with pytest.raises(UserError, match="run `scratchllm prepare"):
        load_tokens(tmp_path / "o", "train")


def test_dedup_and_empty_documents(tmp_path, tok_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                 ["same", "same", "  ", "other", "same"]))
    meta = prepare([str(tmp_path / "d.jsonl")], tok_path, tmp_path / "o",
                   PrepareOptions(val_fraction=0, dedup=True))
    assert meta["stats"]["duplicates_dropped"] == 2 and meta["stats"]["empty_dropped"] == 1
    tok = Tokenizer.load(tok_path)
    assert decode_file(tok, tmp_path / "o" / "train.bin") == "same<|endoftext|>other<|endoftext|>"


@pytest.mark.parametrize("held_in_memory", [True, False])
def test_dedup_drops_long_duplicate_documents(tmp_path, tok_path, monkeypatch, held_in_memory):
    if not held_in_memory:  # a long document waiting for its hash goes to a temp file
        monkeypatch.setattr(prepare_module, "HOLD_MEMORY_BYTES", 1_000)
    line = "Now is the winter of our discontent made glorious summer.\n"
    long_a, long_b = line * 160, line.upper() * 160  # 9 KB: several segments each
    src = tmp_path / "src"
    src.mkdir()
    for name, text in [("1.txt", long_a), ("2.txt", long_b), ("3.txt", long_a),
                       ("4.txt", long_a[:-1]), ("5.txt", long_b)]:
        (src / name).write_text(text)
    assert len(list(iter_segments(str(src / "1.txt")))) > 2
    meta = prepare([str(src)], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0,
                                                                         dedup=True))
    assert meta["stats"]["duplicates_dropped"] == 2 and meta["splits"]["train"]["documents"] == 3
    tok = Tokenizer.load(tok_path)
    expected = "".join(t + "<|endoftext|>" for t in (long_a, long_b, long_a[:-1]))
    assert decode_file(tok, tmp_path / "o" / "train.bin") == expected
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_val_docs_counts_documents_not_segments(tmp_path, tok_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = [f"Document {i} begins here.\n" + f"Line {i} of a long text.\n" * 400
            for i in range(4)]  # about 10,000 characters each: several segments
    for i, doc in enumerate(docs):
        (src / f"{i}.txt").write_text(doc)
    meta = prepare([str(src)], tok_path, tmp_path / "o", PrepareOptions(val_docs=2))
    val, train = meta["splits"]["val"], meta["splits"]["train"]
    assert val["documents"] == 2 and train["documents"] == 2
    assert val["segments"] > 2 and train["segments"] > 2
    tok = Tokenizer.load(tok_path)
    assert decode_file(tok, tmp_path / "o" / "val.bin") == "".join(
        d + "<|endoftext|>" for d in docs[:2])
    assert decode_file(tok, tmp_path / "o" / "train.bin") == "".join(
        d + "<|endoftext|>" for d in docs[2:])


def test_uint32_for_large_vocabularies(tmp_path, gpt2_tok):
    from scratchllm.data.shards import dtype_for

    assert dtype_for(gpt2_tok.vocab_size) == np.uint16 and dtype_for(70_000) == np.uint32


BINARY = bytes(range(1, 256)) * 40  # no NUL byte at all, half the bytes not UTF-8


@pytest.mark.parametrize(
    "files, match",
    [
        ({"x.jsonl": '{"text": "ok"}\n{oops\n'}, r"x.jsonl:2: not valid JSON"),
        ({"x.jsonl": '{"text": "ok"}\n{"body": "no"}\n'}, r"x.jsonl:2: no field 'text'"),
        ({"x.txt": "   \n\n"}, "empty after cleaning"),
        ({"x.txt": b"\x7fELF\x00\x00binary"}, "x.txt looks like a binary file"),
        ({"a.txt": "fine text", "x.txt": BINARY},
         r"x.txt looks like a binary file \(or text not in UTF-8\): more than 1%"),
        ({}, "no readable files"),
    ],
)
def test_bad_corpora(tmp_path, tok_path, files, match):
    src = tmp_path / "src"
    src.mkdir()
    for name, content in files.items():
        path = src / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        prepare([str(src)], tok_path, out)
    # Refused while listing the sources: nothing made. While reading: an empty directory,
    # every temp file removed.
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == (
        None if match == "no readable files" else [])


def test_undecodable_bytes_are_counted(tmp_path, tok_path):
    text = "naïve café\n" + "plain English text, line after line.\n" * 50  # 1,962 bytes
    (tmp_path / "l.txt").write_bytes(text.encode("latin-1"))  # two bytes (0.1%) not UTF-8
    meta = prepare([str(tmp_path / "l.txt")], tok_path, tmp_path / "o")
    assert meta["stats"]["replaced_bytes"] == 2


@pytest.mark.parametrize("name", ["x.txt", "x.txt.gz"])
def test_mostly_binary_file_is_refused_unless_allowed(tmp_path, tok_path, name):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("some text\n")
    # 2% of the bytes are not UTF-8, none of them in the first 8 KB
    content = b"x" * 9_800 + b"\xff" * 200
    (src / name).write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(UserError, match=rf"{name} looks like a binary file .*: more than 1% of "
                                        r"its 10,000 bytes .*--allow-binary"):
        prepare([str(src)], tok_path, tmp_path / "o")
    with pytest.raises(UserError, match="looks like a binary file"):
        list(texts_from_source(str(src)))
    meta = prepare([str(src)], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0,
                                                                        allow_binary=True))
    assert meta["stats"]["replaced_bytes"] == 200
    tok = Tokenizer.load(tok_path)
    assert decode_file(tok, tmp_path / "o" / "train.bin") == (
        "some text\n<|endoftext|>" + "x" * 9_800 + "\ufffd" * 200 + "<|endoftext|>")


def test_allow_binary_flags(tmp_path, tok_path, capsys):
    from scratchllm.cli import main

    (tmp_path / "b.txt").write_bytes(BINARY)
    for command in (["prepare", "--tokenizer", str(tok_path), "--out", str(tmp_path / "o")],
                    ["tokenizer", "train", "--vocab-size", "260", "--out", str(tmp_path / "t")]):
        assert main([*command, "--data", str(tmp_path / "b.txt")]) == 1
        assert "b.txt looks like a binary file" in capsys.readouterr().err
        assert main([*command, "--data", str(tmp_path / "b.txt"), "--allow-binary"]) == 0
    assert read_meta(tmp_path / "o")["stats"]["replaced_bytes"] == 128 * 40


# --- loaders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens():
    return np.arange(10_000, dtype=np.uint16) % 997


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(a, b):
    return all((x1 == x2).all() and (y1 == y2).all() for (x1, y1), (x2, y2) in zip(a, b,
                                                                                  strict=True))


@pytest.mark.parametrize("kind", [RandomWindows, SequentialWindows])
def test_loaders_are_seeded_and_resume_exactly(tokens, kind):
    run = batches(kind(tokens, 4, 32, seed=3), 40)
    assert same(run, batches(kind(tokens, 4, 32, seed=3), 40))
    assert not same(run, batches(kind(tokens, 4, 32, seed=4), 40))
    first = kind(tokens, 4, 32, seed=3)
    batches(first, 25)
    state = json.loads(json.dumps(first.state_dict()))  # it survives JSON
    resumed = kind(tokens, 4, 32, seed=3)
    resumed.load_state_dict(state)
    assert same(batches(resumed, 15), run[25:])
    x, y = run[0]
    assert x.shape == (4, 32) and x.dtype.is_floating_point is False
    assert (x[:, 1:] == y[:, :-1]).all()


def test_sequential_epoch_sees_every_window_once():
    tokens = np.arange(1000, dtype=np.uint32)  # a window's first token is its offset
    loader = SequentialWindows(tokens, 4, 10, seed=0)
    assert loader.steps_per_epoch == 24  # 99 windows of 10 (+1) tokens, 96 in full batches
    epoch = [int(s) for x, _ in batches(loader, 24) for s in x[:, 0]]
    assert len(set(epoch)) == 96 and all(s % 10 == 0 for s in epoch)
    assert epoch != sorted(epoch)  # shuffled
    next_epoch = [int(s) for x, _ in batches(loader, 24) for s in x[:, 0]]
    assert next_epoch != epoch and loader.epoch == 1


def test_ranks_read_disjoint_data(tokens):
    seen = []
    for rank in range(2):
        loader = SequentialWindows(np.arange(10_000, dtype=np.uint32), 4, 32, seed=1, rank=rank,
                                   world_size=2)
        seen.append({int(x[0]) for b in batches(loader, loader.steps_per_epoch) for x in b[0]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    ranges = []
    for rank in range(2):
        loader = RandomWindows(np.arange(10_000, dtype=np.uint32), 8, 32, rank=rank, world_size=2)
        xs = [b[0] for b in batches(loader, 20)]
        ranges.append((min(int(x.min()) for x in xs), max(int(x.max()) for x in xs)))
    assert ranges[0][1] < 5000 <= ranges[1][0]


def test_document_aligned_windows():
    tokens = np.array(([5] * 50 + [0]) * 20, dtype=np.uint16)  # documents end with eot=0
    tokens[::51] = 7  # every document starts with 7
    loader = RandomWindows(tokens, 16, 20, align_to_documents=True, eot_id=0)
    for x, _ in batches(loader, 5):
        assert (x[:, 0] == 7).all()


def test_sliding_window_dataset_as_in_the_book():
    ids = list(range(100))
    ds = SlidingWindowDataset(ids, context_length=4, stride=4)
    assert len(ds) == 24
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    with pytest.raises(UserError, match="fewer than context_length"):
        SlidingWindowDataset(ids[:3], context_length=4, stride=1)


def test_text_dataloader(trained_tok, data):
    text = (data / "the-verdict" / "the-verdict.txt").read_text()
    loader = text_dataloader(text, trained_tok, batch_size=8, context_length=4, stride=4,
                             shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (8, 4) and trained_tok.decode(x[0].tolist()) == text[: len(
        trained_tok.decode(x[0].tolist()))]


def test_loader_errors(tmp_path, tok_path):
    with pytest.raises(UserError, match="fewer than context_length"):
        RandomWindows(np.zeros(10, dtype=np.uint16), 2, 32)
    with pytest.raises(UserError, match="does not belong"):
        RandomWindows(np.zeros(100, dtype=np.uint16), 2, 8).load_state_dict(
            {"kind": "sequential", "seed": 0, "rank": 0})
    prepare(["the-verdict"], tok_path, tmp_path / "o", PrepareOptions(val_fraction=0))
    with pytest.raises(UserError, match="val split .* is empty"):
        load_tokens(tmp_path / "o", "val")
    assert read_meta(tmp_path / "o")["splits"]["train"]["tokens"] > 0
