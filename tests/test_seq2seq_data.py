"""Parallel corpora: every input format, named sets and their directions, one-line errors for bad
input, leak-free splits, token-budget batches with padding masks, and the metrics."""

import json

import pytest
import torch

from scratchllm.data import parallel, registry
from scratchllm.data.parallel import Example, TokenBatches, bucket, make_batch, read_pairs
from scratchllm.errors import UserError


@pytest.fixture(autouse=True)
def mirror(data, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_DATA_DIR", str(data))


def test_named_sets_read_the_shared_files_in_either_direction(data):
    fr_en = read_pairs("tatoeba-fra-eng", "fra", "eng")
    assert len(fr_en) == 1000
    assert fr_en[0] == ("Au commencement, Dieu créa le ciel et la terre.",
                        "In the beginning God created the heaven and the earth.")
    en_fr = read_pairs("tatoeba-fra-eng", "en", "fr")
    assert en_fr[0] == fr_en[0][::-1]
    de_en = read_pairs("tatoeba-deu-eng", "de", "en")
    assert len(de_en) == 1000 and de_en[0][1] == "Mary said she didn't know where Tom was."
    tico = read_pairs("tico19-en-fr", "fr", "en")
    assert len(tico) == 3071
    assert tico[0] == ("depuis combien ressentez-vous ces symptômes ?",
                       "about how long have these symptoms been going on?")
    both = read_pairs("tatoeba-fra-eng+tico19-en-fr", "fr", "en")
    assert both == fr_en + tico  # '+' joins sets, each turned to the same direction
    # The registry pins the new files by size and sha256 like the others.
    for name in ("tatoeba-deu-eng", "tico19-en-fr"):
        assert all(f.sha256 and f.size and f.url.startswith("https://")
                   for f in registry.get(name).files)
    assert sum(1 for _ in registry.documents("tico19-en-fr")) == 3071


def test_every_file_format(tmp_path):
    (tmp_path / "a.fr").write_text("Bonjour.\nMerci !\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("Hello.\nThank you!\n", encoding="utf-8")
    expected = [("Bonjour.", "Hello."), ("Merci !", "Thank you!")]
    assert read_pairs(f"{tmp_path / 'a.fr'},{tmp_path / 'a.en'}") == expected
    (tmp_path / "p.tsv").write_text("Bonjour.\tHello.\n\nMerci !\tThank you!\n",
                                    encoding="utf-8")
    assert read_pairs(str(tmp_path / "p.tsv")) == expected
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": a, "target": b}) + "\n"
                                              for a, b in expected), encoding="utf-8")
    assert read_pairs(str(tmp_path / "p.jsonl")) == expected
    (tmp_path / "d.jsonl").write_text(json.dumps({"article": "A b. C d.", "summary": "A b."}),
                                      encoding="utf-8")
    assert read_pairs(str(tmp_path / "d.jsonl"), source_field="article",
                      target_field="summary") == [("A b. C d.", "A b.")]
    tmx = ('<?xml version="1.0"?><tmx version="1.4"><body>'
           + "".join(f'<tu><tuv xml:lang="FR-fr"><seg>{a}</seg></tuv>'
                     f'<tuv xml:lang="en-US"><seg>{b}</seg></tuv></tu>' for a, b in expected)
           + "</body></tmx>")
    (tmp_path / "m.tmx").write_text(tmx, encoding="utf-8")
    assert read_pairs(str(tmp_path / "m.tmx"), "fr", "en") == expected
    assert read_pairs(str(tmp_path / "m.tmx"), "eng", "fra") == [(b, a) for a, b in expected]
    assert read_pairs(str(tmp_path / "m.tmx")) == [(b, a) for a, b in expected]  # sorted langs


@pytest.mark.parametrize("case, message", [
    ("misaligned", "has 2 lines but"),
    ("empty-side", "pair 2 has an empty target side"),
    ("unknown-pair", "holds fr-en pairs, not de-en"),
    ("tmx-language", "has no de segments"),
    ("tsv-no-tab", "has no TAB"),
    ("jsonl-fields", "needs the fields"),
    ("unknown-spec", "cannot read parallel data"),
    ("mixed-directions", "go different ways"),
    ("missing-file", "not found"),
])
def test_bad_input_is_a_one_line_error(tmp_path, case, message):
    (tmp_path / "a.fr").write_text("Bonjour.\nMerci !\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("Hello.\n", encoding="utf-8")
    (tmp_path / "b.en").write_text("Hello.\n \n", encoding="utf-8")
    (tmp_path / "m.tmx").write_text('<tmx><body><tu><tuv xml:lang="en"><seg>Hi</seg></tuv>'
                                    '<tuv xml:lang="fr"><seg>Salut</seg></tuv></tu></body></tmx>',
                                    encoding="utf-8")
    (tmp_path / "p.tsv").write_text("no tab here\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"src": "a", "tgt": "b"}\n', encoding="utf-8")
    spec, langs = {
        "misaligned": (f"{tmp_path / 'a.fr'},{tmp_path / 'a.en'}", ()),
        "empty-side": (f"{tmp_path / 'a.fr'},{tmp_path / 'b.en'}", ()),
        "unknown-pair": ("tatoeba-fra-eng", ("de", "en")),
        "tmx-language": (str(tmp_path / "m.tmx"), ("de", "en")),
        "tsv-no-tab": (str(tmp_path / "p.tsv"), ()),
        "jsonl-fields": (str(tmp_path / "p.jsonl"), ()),
        "unknown-spec": ("no-such-set", ()),
        "mixed-directions": ("tatoeba-fra-eng+tico19-en-fr", ()),
        "missing-file": (f"{tmp_path / 'x.fr'},{tmp_path / 'x.en'}", ()),
    }[case]
    with pytest.raises(UserError, match=message) as e:
        read_pairs(spec, *langs)
    assert "\n" not in str(e.value)


def test_splits_are_seeded_deduplicated_and_never_share_a_source():
    pairs = [(f"s{i % 50}", f"t{i}") for i in range(120)] + [("s0", "t0")]  # repeats
    splits = parallel.split_pairs(pairs, val_size=10, test_size=20, seed=3)
    assert splits == parallel.split_pairs(pairs, val_size=10, test_size=20, seed=3)
    sources = {name: {s for s, _ in split} for name, split in splits.items()}
    assert not (sources["train"] & sources["test"]) and not (sources["train"] & sources["val"])
    assert sum(map(len, splits.values())) == 120  # the exact duplicate once
    assert len(splits["test"]) >= 20 and len(splits["val"]) >= 10
    with pytest.raises(UserError, match="nothing to train on"):
        parallel.split_pairs(pairs[:30], val_size=10, test_size=100, seed=0)


def test_batches_hold_at_most_max_tokens_with_padding_masks():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (300,), generator=g)  # a target about as long as its source
    examples = [Example(torch.randint(3, 50, (int(n),), generator=g).tolist() + [1],
                        torch.randint(3, 50, (int(n) + int(d),), generator=g).tolist())
                for n, d in zip(lengths, torch.randint(0, 4, (300,), generator=g), strict=True)]
    batches = bucket(examples, max_tokens=400, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(300))  # each example once
    for rows in batches:
        src, targets, tgt_in, mask = make_batch([examples[i] for i in rows], 0, 1, 1)
        assert src.numel() + tgt_in.numel() <= 400
        for j, i in enumerate(rows):
            e = examples[i]
            assert mask[j].sum() == len(e.source) and src[j, :len(e.source)].tolist() == e.source
            assert tgt_in[j, :len(e.target) + 1].tolist() == [1, *e.target]
            assert targets[j, :len(e.target) + 1].tolist() == [*e.target, 1]
            assert (targets[j, len(e.target) + 1:] == -100).all()
    # Bucketing keeps padding low: most of each batch is real tokens.
    real = sum(len(e.source) + len(e.target) + 1 for e in examples)
    padded = sum(make_batch([examples[i] for i in b], 0, 1, 1)[0].numel()
                 + make_batch([examples[i] for i in b], 0, 1, 1)[2].numel() for b in batches)
    assert real / padded > 0.85


def test_token_batches_resume_exactly_and_reject_another_run():
    examples = [Example([i % 7 + 3, 1], [i % 5 + 3] * (i % 4 + 1)) for i in range(40)]
    a = TokenBatches(examples, 24, 0, 1, 1, seed=5)
    for _ in range(a.steps_per_epoch + 3):  # into the second epoch
        a.next_batch()
    b = TokenBatches(examples, 24, 0, 1, 1, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(), b.next_batch(),
                                                     strict=True))
    with pytest.raises(UserError, match="another run"):
        TokenBatches(examples, 24, 0, 1, 1, seed=6).load_state_dict(a.state_dict())


def test_two_ranks_read_what_one_process_reads_and_resume_on_one():
    examples = [Example([i % 7 + 3, 1], [i % 5 + 3] * (i % 4 + 1)) for i in range(40)]

    def batches(rank: int = 0, world_size: int = 1) -> TokenBatches:
        b = TokenBatches(examples, 24, 0, 1, 1, seed=5)
        b.shard(rank, world_size)
        return b

    one, ranks = batches(), [batches(0, 2), batches(1, 2)]
    assert ranks[0].steps_per_epoch == one.steps_per_epoch // 2
    for _ in range(ranks[0].steps_per_epoch):  # a whole epoch: batch by batch the same
        for rank in ranks:
            assert all(torch.equal(x, y) for x, y in zip(rank.next_batch(), one.next_batch(),
                                                         strict=True))
    ranks[0].next_batch()  # one step into the next epoch, then resume in one process
    resumed = batches()
    resumed.load_state_dict(ranks[0].state_dict())
    assert (resumed.epoch, resumed.index) == (1, 2)
    with pytest.raises(UserError, match="fewer than 99 data-parallel ranks"):
        batches().shard(0, 99)


def test_summarization_smoke_set_is_paragraph_to_first_sentence():
    text = ("A short line.\n\nThe first sentence is here. The second one follows it. A third "
            "one ends the paragraph, which is long enough to count as a small document for "
            "the smoke test of the summarization pipeline. And a fourth.\n\nTOO SHORT.")
    [(doc, summary)] = parallel.lead_pairs([text])
    assert summary == "The first sentence is here."
    assert doc.startswith(summary) and doc.endswith("And a fourth.")
    pairs = read_pairs("gutenberg-lead")
    assert len(pairs) > 2000 and all(doc.startswith(s) for doc, s in pairs[:50])


def test_rouge_and_bleu_values():
    from scratchllm.train.seq2seq import bleu_chrf, rouge

    scores = rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    # 5 of 6 unigrams, 3 of 5 bigrams (the cat, on the, the mat), LCS 5 of 6.
    assert scores == {"rouge1": pytest.approx(100 * 5 / 6, abs=0.01),
                      "rouge2": pytest.approx(100 * 3 / 5, abs=0.01),
                      "rougeL": pytest.approx(100 * 5 / 6, abs=0.01)}
    assert rouge(["Hello, World!"], ["hello world"])["rougeL"] == 100.0
    assert rouge(["x"], ["y"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    perfect = bleu_chrf(["The cat sat on the mat."], ["The cat sat on the mat."])
    assert perfect == {"bleu": 100.0, "chrf": 100.0}
    assert bleu_chrf(["a dog"], ["The cat sat on the mat."])["bleu"] < 5


def test_inverse_sqrt_schedule():
    from scratchllm.train.config import OptimConfig
    from scratchllm.train.optim import lr_at

    cfg = OptimConfig(lr=1e-3, schedule="inverse_sqrt", warmup_steps=100)
    assert lr_at(49, cfg, 10_000) == pytest.approx(0.5e-3)  # linear warmup
    assert lr_at(99, cfg, 10_000) == pytest.approx(1e-3)  # the peak
    assert lr_at(399, cfg, 10_000) == pytest.approx(0.5e-3)  # lr * sqrt(100 / 400)
