"""Encoder-decoder vs a decoder-only GPT of the same size vs copying the source, on the shared
Tatoeba + TICO-19 pairs (fr->en and en->fr), and cached vs recomputed cross-attention.

For each direction: `train-seq2seq`'s recipe (the same code as the CLI) splits the pairs
(500 held-out test pairs, never trained or tuned on), trains a shared BPE and the seq2seq model;
a GPT with about the same parameter count trains on the same train pairs and tokenizer as
`source <|endoftext|> target <|endoftext|>` (loss on the target part only), on the same loop
with the same optimizer, schedule, steps and token budget per batch. Both are scored on the
test split with sacrebleu (BLEU, chrF), greedy and with beam search; the copy-the-source
baseline scores the sources themselves. Training speed is real (unpadded) pair tokens per
second. Then greedy decoding speed of the trained seq2seq model: cross-attention keys/values
computed once per source vs recomputed at every step, and no KV cache at all (medians).

    python bench/seq2seq.py                                   # the full comparison
    python bench/seq2seq.py --steps 20 --test 20 --beams 0    # a quick smoke check
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import data_dir, median_time, table, torch_header  # noqa: E402

DIRECTIONS = {"fr-en": ("fr", "en"), "en-fr": ("en", "fr")}
# The seq2seq model: 3+3 pre-norm layers, d_model 192; the GPT below matches its size.
MODEL = {"n_encoder_layer": 3, "n_decoder_layer": 3, "n_head": 4, "n_embd": 192,
         "mlp_hidden": 768, "embd_dropout": 0.2, "resid_dropout": 0.2, "attn_dropout": 0.1}


def seq2seq_overrides(args, source: str, target: str) -> list[str]:
    return [f"--seq2seq.data={args.data}", f"--seq2seq.source_lang={source}",
            f"--seq2seq.target_lang={target}", f"--seq2seq.test_size={args.test}",
            f"--seq2seq.val_size={args.val}", f"--seq2seq.vocab_size={args.vocab}",
            f"--seq2seq.max_tokens={args.max_tokens}", "--seq2seq.eval_sentences=0",
            "--seq2seq.samples=0", "--model.preset=seq2seq-small",
            *(f"--model.{k}={v}" for k, v in MODEL.items()),
            f"--train.max_steps={args.steps}", f"--train.threads={args.threads}",
            "--train.log_every=50", f"--optim.lr={args.lr}", f"--optim.warmup_steps={args.warmup}",
            "--optim.schedule=inverse_sqrt", "--eval.every=0",
            f"--checkpoint.every={args.steps}"]


class CountingBatches:
    """Wraps the seq2seq batches: counts the real (unpadded) pair tokens they hand out."""

    def __init__(self, inner) -> None:
        self.inner, self.real_tokens = inner, 0

    def next_batch(self):
        src, targets, tgt_in, mask = batch = self.inner.next_batch()
        self.real_tokens += int(mask.sum()) + int((targets != -100).sum())
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def train_seq2seq(args, source: str, target: str, run_dir: Path) -> dict:
    """Train with the seq2seq recipe; report size, time and throughput."""
    from scratchllm.config import load_config
    from scratchllm.train.seq2seq import Seq2SeqTrainConfig, build_seq2seq, seq2seq_trainer

    config = load_config(None, seq2seq_overrides(args, source, target), Seq2SeqTrainConfig)
    counted = {}

    def build(loop):
        recipe = build_seq2seq(loop)
        recipe.batches = counted["b"] = CountingBatches(recipe.batches)
        return recipe

    loop = seq2seq_trainer(config, run_dir, progress=False, log=lambda *_: None)
    loop.build = build
    start = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - start
    return {"params": loop.model.num_params(), "wall_s": wall,
            "tokens_per_s": counted["b"].real_tokens / wall, "model": loop.model.eval()}


class PairLM:
    """GPT training batches: source <eot> target <eot>, the loss on the target part only,
    bucketed by length into batches of at most max_tokens (padded) tokens."""

    def __init__(self, examples, max_tokens: int, eot: int, seed: int) -> None:
        from scratchllm.data.parallel import Example, TokenBatches

        # The seq2seq bucketing picks the rows: a GPT row is source (ending in eot) + target
        # + eot, held as an example with an empty target.
        rows = [Example(e.source + e.target + [eot], []) for e in examples]
        self.order = TokenBatches(rows, max_tokens, 0, 0, 0, seed)
        self.eot, self.real_tokens = eot, 0

    def next_batch(self):
        from scratchllm.model.loss import IGNORE_INDEX

        ids, _, _, mask = self.order.next_batch()  # right-padded rows and their mask
        x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
        for i, n in enumerate(mask.sum(1).tolist()):
            n_source = ids[i, :n].tolist().index(self.eot) + 1  # the first eot ends the source
            y[i, :n_source - 1] = IGNORE_INDEX  # the source is context, not a target
            y[i, n - 1:] = IGNORE_INDEX  # padding
        self.real_tokens += int(mask.sum())
        return x, y

    def state_dict(self):
        return self.order.state_dict()

    def load_state_dict(self, state):
        self.order.load_state_dict(state)


def gpt_config(vocab: int, context: int):
    """A GPT about as large as the seq2seq model: 7 layers of d 192 (GELU, learned positions)."""
    from scratchllm.model import GPTConfig

    return GPTConfig(vocab_size=vocab, context_length=context, n_layer=7, n_head=4,
                     n_embd=MODEL["n_embd"], mlp_hidden=MODEL["mlp_hidden"],
                     embd_dropout=MODEL["embd_dropout"], resid_dropout=MODEL["resid_dropout"],
                     attn_dropout=MODEL["attn_dropout"])


def train_gpt(args, source: str, target: str, seq2seq_dir: Path, run_dir: Path) -> dict:
    """Train a GPT on the seq2seq run's train split and tokenizer, on the same loop."""
    from scratchllm.config import load_config
    from scratchllm.data.parallel import encode_pairs, read_tsv
    from scratchllm.model import GPT, lm_loss_sum
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.train.loop import Recipe, TrainLoop
    from scratchllm.train.seq2seq import Seq2SeqTrainConfig

    config = load_config(None, seq2seq_overrides(args, source, target), Seq2SeqTrainConfig)
    task = config.seq2seq
    tokenizer = load_tokenizer(seq2seq_dir / "tokenizer.json")
    eot = tokenizer.eot_id
    train = encode_pairs(tokenizer, read_tsv(seq2seq_dir / "data" / "train.tsv"), eot,
                         task.max_source_len, task.max_target_len)
    context = task.max_source_len + task.max_target_len
    counted = {}

    def build(loop):
        model = GPT(gpt_config(tokenizer.vocab_size, context))
        batches = counted["b"] = PairLM(train, task.max_tokens, eot, config.train.seed)
        return Recipe(model=model, batches=batches, tokenizer=tokenizer,
                      loss=lambda m, b: lm_loss_sum(m(b[0]), b[1])[0])

    loop = TrainLoop(config, run_dir, build, progress=False, log=lambda *_: None)
    start = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - start
    return {"params": loop.model.num_params(), "wall_s": wall,
            "tokens_per_s": counted["b"].real_tokens / wall, "model": loop.model.eval(),
            "tokenizer": tokenizer}


def gpt_translate(model, tokenizer, texts: list[str], beams: int, max_source: int) -> list[str]:
    """GPT outputs for prompts source <eot> (greedy in length-sorted batches, or beams)."""
    from scratchllm.data.parallel import encode_source
    from scratchllm.generate import GenerationConfig, complete

    eot = tokenizer.eot_id
    prompts = [encode_source(tokenizer, t, eot, max_source) for t in texts]
    outputs = [""] * len(texts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    step = 1 if beams > 1 else 32
    for start in range(0, len(order), step):
        rows = order[start:start + step]
        limit = max(int(1.5 * len(prompts[i])) + 10 for i in rows)
        config = GenerationConfig(max_new_tokens=limit, temperature=0, num_beams=max(beams, 1),
                                  stop_ids=(eot,))
        for i, done in zip(rows, complete(model, [prompts[i] for i in rows], config),
                           strict=True):
            outputs[i] = tokenizer.decode(done.ids).strip()
    return outputs


def score(hyps: list[str], refs: list[str]) -> dict:
    from scratchllm.train.seq2seq import bleu_chrf

    return bleu_chrf(hyps, refs)


@torch.inference_mode()
def fixed_length_decode(model, sources: list[list[int]], n: int, **options) -> int:
    """Greedy-decode exactly n tokens per source (eos ignored: a fixed amount of work);
    returns the tokens generated."""
    state = model.start_decoding(sources, n, **options)
    logits = state.prefill()
    for _ in range(n - 1):
        state.append(logits.argmax(-1))
        logits = state.next_logits()
    return len(sources) * n


def decode_speed(model, tokenizer, texts: list[str], tokens: int, repeats: int
                 ) -> list[list[object]]:
    """Decoding tokens/s, one source at a time and all at once, three ways."""
    from scratchllm.data.parallel import encode_source

    model.eval()
    eos = model.config.eos_id
    sources = [encode_source(tokenizer, t, eos, model.config.context_length) for t in texts]
    rows, base = [], {}
    for batch in (1, len(sources)):
        for name, kw in (("computed once", {}), ("recomputed every step", {"cache_cross": False}),
                         ("recomputed, no KV cache", {"cache_cross": False,
                                                      "use_cache": False})):
            def run(kw=kw, batch=batch):
                return sum(fixed_length_decode(model, sources[i:i + batch], tokens, **kw)
                           for i in range(0, len(sources), batch))

            seconds = median_time(run, repeats)
            rate = len(sources) * tokens / seconds
            base.setdefault(batch, rate)
            rows.append([f"{batch}", name, f"{rate:,.0f}", f"{base[batch] / rate:.2f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", default="fr-en,en-fr")
    parser.add_argument("--data", default="tatoeba-fra-eng+tico19-en-fr")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per model")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak (inverse-sqrt schedule)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--test", type=int, default=500, help="held-out test pairs")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--beams", type=int, default=4, help="beam width (0: greedy only)")
    parser.add_argument("--speed-sentences", type=int, default=32)
    parser.add_argument("--speed-tokens", type=int, default=64, help="tokens decoded per source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("SCRATCHLLM_DATA_DIR", str(data_dir()))
    if args.threads:
        torch.set_num_threads(args.threads)
    from scratchllm.data.parallel import read_tsv
    from scratchllm.train.seq2seq import translate

    print(torch_header())
    print(f"data: {args.data}; {args.steps} steps of <= {args.max_tokens} tokens per model, "
          f"inverse-sqrt lr {args.lr} (warmup {args.warmup}), BPE {args.vocab} shared; "
          f"fp32; scored on {args.test} held-out test pairs (sacrebleu)")
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-seq2seq-"))
    results, speed = [], []
    for direction in args.directions.split(","):
        source, target = DIRECTIONS[direction]
        s2s_dir, gpt_dir = root / f"seq2seq-{direction}", root / f"gpt-{direction}"
        s2s = train_seq2seq(args, source, target, s2s_dir)
        gpt = train_gpt(args, source, target, s2s_dir, gpt_dir)
        test = read_tsv(s2s_dir / "data" / "test.tsv")
        texts, refs = [s for s, _ in test], [t for _, t in test]
        tokenizer = gpt["tokenizer"]
        rows = {"copy the source": {"greedy": score(texts, refs)}}
        max_source = 128
        for name, run in (("seq2seq (enc-dec)", s2s), ("GPT (dec-only)", gpt)):
            decoded = {}
            for beams in ([1, args.beams] if args.beams > 1 else [1]):
                start = time.perf_counter()
                hyps = (translate(run["model"], tokenizer, texts, beams, max_source_len=max_source)
                        if name.startswith("seq2seq")
                        else gpt_translate(run["model"], tokenizer, texts, beams, max_source))
                key = "greedy" if beams == 1 else f"beam {beams}"
                decoded[key] = {**score(hyps, refs), "decode_s": time.perf_counter() - start}
                if beams == 1:
                    decoded["examples"] = list(zip(texts[:3], hyps[:3], refs[:3], strict=True))
            rows[name] = {**decoded, "params": run["params"], "wall_s": run["wall_s"],
                          "tokens_per_s": run["tokens_per_s"]}
        results.append((direction, rows))
        print(json.dumps({direction: {k: {kk: vv for kk, vv in v.items() if kk != "examples"}
                                      for k, v in rows.items()}}), file=sys.stderr)
        if direction == args.directions.split(",")[0]:
            speed = decode_speed(s2s["model"], tokenizer, texts[:args.speed_sentences],
                                 args.speed_tokens, args.repeats)
    for direction, rows in results:
        print(f"\n{direction} ({args.test} test pairs)")
        lines = []
        for name, r in rows.items():
            beam = r.get(f"beam {args.beams}", {})
            lines.append([name, f"{r['params']:,}" if "params" in r else "-",
                          f"{r['greedy']['bleu']:.2f}", f"{r['greedy']['chrf']:.2f}",
                          f"{beam['bleu']:.2f}" if beam else "-",
                          f"{beam['chrf']:.2f}" if beam else "-",
                          f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-",
                          f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"])
        print(table(["model", "params", "BLEU", "chrF", f"BLEU b{args.beams}",
                     f"chrF b{args.beams}", "train tok/s", "train wall"], lines))
        for name in ("seq2seq (enc-dec)", "GPT (dec-only)"):
            for src, hyp, ref in rows[name]["examples"]:
                print(f"  [{name}] {src}\n      -> {hyp}\n      ref {ref}")
    print(f"\ngreedy decoding speed, seq2seq {args.directions.split(',')[0]}: "
          f"{min(args.speed_sentences, args.test)} test sources, {args.speed_tokens} tokens "
          f"each (tokens/s, median of {args.repeats}; slowdown vs cross-attention keys/values "
          "computed once per source)")
    print(table(["batch", "cross-attention K/V", "tokens/s", "slowdown"], speed))
    print(f"\nruns kept in {root}")


if __name__ == "__main__":
    main()
