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
from scratchllm.data.sources import SourceOptions, iter_segments, texts_from_source
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
                 "instruction-data": 1100, "gsm8k": 7473, "tatoeba-fra-eng": 1000,
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


def test_hf_source_streams_the_chosen_split_and_field(tmp_path, tok_path, monkeypatch):
    # No network here: a stand-in `datasets` module records how it is called.
    calls = []
    records = [{"text": "First record.\n", "id": 1}, {"text": "Second one.", "id": 2}]

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub")
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    segments = list(iter_segments("hf:org/set:en@validation", SourceOptions()))
    assert calls == [("org/set", "en", "validation", True)]
    assert [seg.text for seg in segments] == [r["text"] for r in records]
    meta = prepare(["hf:org/set"], tok_path, tmp_path / "out", PrepareOptions(val_fraction=0))
    assert calls[-1] == ("org/set", None, "train", True) and meta["splits"]["train"][
        "documents"] == 2
    expected = "".join(r["text"] + "<|endoftext|>" for r in records)
    assert decode_file(Tokenizer.load(tok_path), tmp_path / "out" / "train.bin") == expected
    with pytest.raises(UserError, match="record 0: no field 'body'.*--text-field"):
        list(iter_segments("hf:org/set", SourceOptions(text_field="body")))
    with pytest.raises(UserError, match="cannot open HF dataset 'missing/set'"):
        list(iter_segments("hf:missing/set", SourceOptions()))


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


def test_uint32_for_large_vocabularies(tmp_path, gpt2_tok):
    from scratchllm.data.shards import dtype_for

    assert dtype_for(gpt2_tok.vocab_size) == np.uint16 and dtype_for(70_000) == np.uint32


@pytest.mark.parametrize(
    "files, match",
    [
        ({"x.jsonl": '{"text": "ok"}\n{oops\n'}, r"x.jsonl:2: not valid JSON"),
        ({"x.jsonl": '{"text": "ok"}\n{"body": "no"}\n'}, r"x.jsonl:2: no field 'text'"),
        ({"x.txt": "   \n\n"}, "empty after cleaning"),
        ({"x.txt": b"\x7fELF\x00\x00binary"}, "binary"),
        ({}, "no readable files"),
    ],
)
def test_bad_corpora(tmp_path, tok_path, files, match):
    src = tmp_path / "src"
    src.mkdir()
    for name, content in files.items():
        path = src / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(UserError, match=match):
        prepare([str(src)], tok_path, tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").glob(".*")) if (tmp_path / "out").exists() else True


def test_undecodable_bytes_are_counted(tmp_path, tok_path):
    (tmp_path / "l.txt").write_bytes("naïve café\n".encode("latin-1") * 5)
    meta = prepare([str(tmp_path / "l.txt")], tok_path, tmp_path / "o")
    assert meta["stats"]["replaced_bytes"] == 10


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
