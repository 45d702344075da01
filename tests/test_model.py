"""The transformer on its own: configs, attention paths, position encodings, KV cache, loss."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from scratchllm.errors import UserError
from scratchllm.model import (
    GPT,
    PRESETS,
    GPTConfig,
    attention,
    count_params,
    fastpath,
    flops_per_token,
    lm_loss,
    lm_loss_sum,
    mfu,
)
from scratchllm.model.attention import explicit_attention, sdpa_attention
from scratchllm.model.fastpath import derived_names
from scratchllm.model.layers import Linear, alibi_slopes, sinusoidal_table

POS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=61, context_length=32, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def build(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def ids(B: int = 2, T: int = 12, seed: int = 1, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- configs and counts --------------------------------------------------------------------

PUBLISHED = {  # parameter counts with tied embeddings (GPT-2) / as released (TinyLlama)
    "gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200, "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_param_counts_match_published(name):
    assert count_params(GPTConfig.preset(name)) == PUBLISHED[name]


def test_cpu_presets():
    assert GPTConfig.preset("baby").to_dict() | {} == GPTConfig(
        vocab_size=4096, context_length=256, n_layer=6, n_head=6, n_embd=384).to_dict()
    for name in ("nano", "micro", "baby", "llama-tiny"):
        assert GPTConfig.preset(name).vocab_size == 4096
    assert GPTConfig.preset("gpt2-small").vocab_size == 50257
    llama = GPTConfig.preset("llama-tiny")
    assert (llama.pos_encoding, llama.norm, llama.mlp, llama.n_kv_head) == ("rope", "rmsnorm",
                                                                            "swiglu", 2)
    assert GPTConfig.preset("nano", n_layer=1).n_layer == 1
    assert set(PRESETS) >= {"nano", "micro", "baby", "llama-tiny", "gpt2-small", "gpt2-xl"}


def test_non_embedding_count_and_flops():
    cfg = GPTConfig.preset("gpt2-small")
    d, L, V = 768, 12, 50257
    assert count_params(cfg, embeddings=False) == 124_439_808 - V * d - 1024 * d
    assert count_params(cfg, embeddings=False) == L * (12 * d * d + 13 * d) + 2 * d
    n = count_params(cfg, embeddings=False) + V * d
    assert flops_per_token(cfg) == 6 * n + 12 * L * d * 1024
    assert mfu(cfg, 1000.0, 1e12) == pytest.approx(flops_per_token(cfg) * 1000 / 1e12)


@pytest.mark.parametrize("kw, words", [
    (dict(n_embd=30, n_head=4), ["n_embd (30)", "divisible by n_head (4)"]),
    (dict(n_head=4, n_kv_head=3), ["n_kv_head (3)", "divide n_head (4)"]),
    (dict(pos_encoding="rotary"), ["unknown", "pos_encoding", "rope"]),
    (dict(norm="batchnorm"), ["unknown", "norm", "layernorm, rmsnorm"]),
    (dict(n_layer=0), ["n_layer", "positive"]),
    (dict(attn_dropout=1.5), ["attn_dropout"]),
])
def test_bad_configs_fail_at_construction(kw, words):
    with pytest.raises(UserError) as err:
        tiny(**kw)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_unknown_preset_and_field_suggest_nearest():
    with pytest.raises(UserError, match="did you mean 'gpt2-small'"):
        GPTConfig.preset("gpt2-smal")
    with pytest.raises(UserError, match="did you mean 'n_head'"):
        GPTConfig.from_dict({"n_heads": 4})


# ---- structure -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, from importing inductor
def test_state_dict_keys_clean_and_stable():
    model = GPT(GPTConfig.preset("nano"))
    keys = list(model.state_dict())
    block0 = [k.removeprefix("blocks.0.") for k in keys if k.startswith("blocks.0.")]
    assert keys[:2] == ["tok_emb.weight", "pos_emb.weight"]
    assert block0 == [f"{m}.{p}" for m in ("norm1", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                                             "attn.o_proj", "norm2", "mlp.up_proj",
                                             "mlp.down_proj") for p in ("weight", "bias")]
    assert keys[-3:] == ["norm_f.weight", "norm_f.bias", "lm_head.weight"]
    assert len(keys) == 2 + 4 * 16 + 3
    assert model.lm_head.weight is model.tok_emb.weight  # tied
    model.compile()  # in place: the parameter names must not change (no _orig_mod.)
    assert list(model.state_dict()) == keys
    llama = GPT(GPTConfig.preset("llama-tiny"))
    lkeys = list(llama.state_dict())
    assert "blocks.3.mlp.gate_proj.weight" in lkeys and not any("bias" in k for k in lkeys)
    assert not any("cos" in k or "mask" in k for k in keys + lkeys)  # buffers stay out


def test_dropout_only_in_training():
    model = build(embd_dropout=0.3, attn_dropout=0.3, resid_dropout=0.3).train()
    x = ids()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("baby"))
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(model.blocks[0].attn.q_proj.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.tok_emb.weight) == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 6)
    assert std(model.blocks[3].attn.o_proj.weight) == pytest.approx(scaled, rel=0.05)
    assert std(model.blocks[3].mlp.down_proj.weight) == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].mlp.up_proj.bias.abs().max() == 0
    assert torch.all(model.blocks[0].norm1.weight == 1)


def test_sinusoidal_matches_formula():
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = build(pos_encoding="sinusoidal")
    assert torch.equal(model.sin_table, sinusoidal_table(32, 32))


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(k + 1) for k in range(8)]))
    assert alibi_slopes(6).tolist() == pytest.approx(  # 4 of the 4-head series, 2 of the 8-head
        [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


# ---- attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_kernels_agree(n_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, n_kv, 7, 8, generator=g), torch.randn(2, n_kv, 7, 8, generator=g)
    ref = explicit_attention(q, k, v, causal=True)
    assert torch.allclose(sdpa_attention(q, k, v, causal=True), ref, atol=1e-6)
    # Against a from-the-definition loop for the first head, last query.
    kk = k.repeat_interleave(4 // n_kv, dim=1)
    w = torch.softmax(q[0, 0, -1] @ kk[0, 0].T / math.sqrt(8), dim=-1)
    vv = v.repeat_interleave(4 // n_kv, dim=1)
    assert torch.allclose(ref[0, 0, -1], w @ vv[0, 0], atol=1e-6)
    mask = torch.zeros(2, 1, 7, 7).masked_fill(torch.rand(2, 1, 7, 7, generator=g) < 0.3, -math.inf)
    mask[..., 0] = 0.0
    assert torch.allclose(sdpa_attention(q, k, v, mask, causal=False),
                          explicit_attention(q, k, v, mask, causal=False), atol=1e-6)


def test_attention_masks_causal_flag_and_cross_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    causal_keep = keep & torch.ones(5, 5, dtype=torch.bool).tril()
    for kernel in (explicit_attention, sdpa_attention):
        # a boolean mask means the same as its additive form; causal=True adds the triangle
        bool_out = kernel(q, k, v, keep, causal=True)
        torch.testing.assert_close(bool_out, kernel(q, k, v, additive, causal=True))
        torch.testing.assert_close(bool_out, kernel(q, k, v, causal_keep, causal=False))
        # cross-attention: 5 queries over 3 keys, no causality: every key counts, from the
        # definition
        kc, vc = k[:, :, :3], v[:, :, :3]
        w = torch.softmax(q @ kc.transpose(-2, -1) / 2.0, dim=-1)
        torch.testing.assert_close(kernel(q, kc, vc, causal=False), w @ vc)
    # a causal query block at the end of a longer key sequence (a cached prefix)
    torch.testing.assert_close(sdpa_attention(q[:, :, -2:], k, v, causal=True),
                               explicit_attention(q, k, v, causal=True)[:, :, -2:])


@pytest.mark.parametrize("pos", POS)
def test_explicit_path_equals_sdpa_path(pos):
    fast = build(pos_encoding=pos, n_kv_head=2)
    slow = build(pos_encoding=pos, n_kv_head=2, attention="explicit")
    slow.load_state_dict(fast.state_dict())
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.allclose(fast(x), slow(x), atol=1e-5)
        assert torch.allclose(fast(x, attention_mask=mask), slow(x, attention_mask=mask),
                              atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("pos", POS)
def test_future_tokens_never_change_the_past(pos, attention):
    model = build(pos_encoding=pos, attention=attention)
    x = ids(1, 16)
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("pos", POS)
def test_left_padding_gives_the_unpadded_logits(pos):
    model = build(pos_encoding=pos, n_kv_head=2)
    x = ids(1, 9)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], dim=1).long()
    with torch.no_grad():
        ref = model(x)
        out = model(padded, attention_mask=mask)
        right = model(torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1),
                      attention_mask=mask.flip(1))
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3:], ref, atol=1e-5)
    assert torch.allclose(right[:, :9], ref, atol=1e-5)


# ---- KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", POS)
def test_kv_cache_decoding_matches_full_forward(pos):
    model = build(pos_encoding=pos, n_kv_head=2)
    x = ids(2, 14)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(batch_size=2, max_seq=20)
        steps = [model(x[:, :5], cache=cache, input_pos=torch.arange(5))]  # prefill
        for t in range(5, 14):  # one token at a time
            steps.append(model(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])))
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_kv_cache_with_left_padding(pos):
    model = build(pos_encoding=pos)
    x = ids(2, 10)
    x[0, :4] = 0
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # row 0: 4 pad tokens on the left, row 1: none
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        cache = model.make_cache(batch_size=2, max_seq=16)
        steps = [model(x[:, :6], attention_mask=mask[:, :6], cache=cache,
                       input_pos=torch.arange(6))]
        for t in range(6, 10):
            steps.append(model(x[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache,
                               input_pos=torch.tensor([t])))
        alone = model(x[:1, 4:])  # row 0 without its padding
    out = torch.cat(steps, dim=1)
    assert torch.allclose(out[:, 4:], full[:, 4:], atol=1e-5)
    assert torch.allclose(out[1], full[1], atol=1e-5)
    assert torch.allclose(out[0, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_logits_to_keep_gives_the_last_rows(pos):
    model = build(pos_encoding=pos)
    x = ids(2, 10)
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        full, full_loss = model(x, y)
        last = model(x, logits_to_keep=1)
        tail, tail_loss = model(x, y, logits_to_keep=3)
        cache = model.make_cache(batch_size=2, max_seq=16)
        prefill = model(x, cache=cache, input_pos=torch.arange(10), logits_to_keep=1)
    assert last.shape == (2, 1, 61) and torch.allclose(last, full[:, -1:], atol=1e-6)
    assert torch.allclose(prefill, full[:, -1:], atol=1e-5)
    assert torch.allclose(tail, full[:, -3:], atol=1e-6)
    assert torch.allclose(tail_loss, F.cross_entropy(full[:, -3:].reshape(-1, 61),
                                                     y[:, -3:].reshape(-1)), atol=1e-6)
    assert torch.equal(model(x, logits_to_keep=0), full) and torch.equal(
        model(x, logits_to_keep=10), full)  # 0 or >= T: every position


def test_one_row_linear_tracks_weight_changes(monkeypatch):
    monkeypatch.setattr(fastpath, "PACK_ONE_ROW", 0)  # pack even this small weight
    lin = Linear(8, 24)
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-6)
        assert "_packed" in derived_names(lin)  # the packed path ran, not plain F.linear
        lin.weight.mul_(2)  # in place: the cached packed copy must be rebuilt
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-6)
        lin.load_state_dict({"weight": torch.randn(24, 8), "bias": torch.randn(24)})
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-6)
    lin.weight = torch.nn.Parameter(torch.randn(24, 8))  # a new tensor
    with torch.inference_mode():
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-6)
    assert "_packed" not in lin.state_dict() and len(lin.state_dict()) == 2
    copy.deepcopy(lin)  # a model with packed copies can still be copied
    y = lin(x)  # with grad enabled it is plain F.linear, and differentiable
    y.sum().backward()
    assert lin.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17])
@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (16, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_linear_equals_f_linear(rows, shape, bias, dtype):
    # Up to 16 rows (a decode step) take the packed-weight product; more take F.linear.
    lin = Linear(*shape, bias=bias).to(dtype)
    x = torch.randn(rows, 1, shape[0]).to(dtype)  # a decode step of `rows` sequences
    with torch.no_grad():
        for _ in range(2):  # second round: after an in-place change of the weight
            y = lin(x)
            assert y.shape == (rows, 1, shape[1]) and y.dtype == dtype and y.is_contiguous()
            want = F.linear(x.float(), lin.weight.float(), None if not bias else lin.bias.float())
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
            lin.weight.mul_(-0.5)


@pytest.mark.parametrize("bias", [True, False])
def test_padded_output_linear_equals_f_linear_with_gradients(bias):
    # The CUDA path for outputs of an unaligned width (GPT-2's 50,257 tokens), run here on the
    # CPU: the same values and the same gradients as F.linear, parameters unchanged in shape.
    from scratchllm.model.fastpath import padded_output_linear

    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    b = torch.randn(13, requires_grad=True) if bias else None
    grad = torch.randn(2, 3, 13)
    y = padded_output_linear(x, w, b, 64)
    assert y.shape == (2, 3, 13)
    got = torch.autograd.grad(y, [x, w] + ([b] if bias else []), grad)
    ref = F.linear(x, w, b)
    want = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), grad)
    assert torch.allclose(y, ref, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5)
    # the strided logits view feeds our loss as contiguous logits do, in fp32 and bf16
    from scratchllm.model.loss import lm_loss

    targets = torch.tensor([[1, 12, -100], [0, 5, 7]])
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        losses = [lm_loss(padded_output_linear(xd, wd, None, 64), targets),
                  lm_loss(F.linear(xd, wd), targets)]
        grads = [torch.autograd.grad(loss, [xd, wd]) for loss in losses]
        torch.testing.assert_close(losses[0], losses[1])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b)


def test_fused_qkv_decode_step_equals_separate_projections(monkeypatch):
    monkeypatch.setattr(fastpath, "PACK_ONE_ROW", 0)  # pack even these small weights
    cfg = GPTConfig.preset("nano", vocab_size=50, context_length=16, n_kv_head=2)  # GQA
    attn = GPT(cfg).blocks[0].attn
    x = torch.randn(1, 1, cfg.n_embd)
    with torch.no_grad():
        for _ in range(2):  # second round: after an in-place change of one weight
            q, k, v = attn._project_qkv(x)  # the fused, packed (q + k + v, C) copy
            assert "_qkv_packed" in derived_names(attn)  # it ran (else q_proj vs itself)
            assert torch.allclose(q, attn.q_proj(x), atol=1e-6)
            assert torch.allclose(k, attn.k_proj(x), atol=1e-6)
            assert torch.allclose(v, attn.v_proj(x), atol=1e-6)
            assert k.shape[-1] == 2 * cfg.head_dim
            attn.v_proj.weight.mul_(3)
    assert not any(key.startswith("_qkv") for key in attn.state_dict())


def test_one_bf16_row_runs_torch_gemv_for_linear_and_fused_qkv(monkeypatch):
    # Batch-1 bf16 decode: torch's own GEMV on the plain (out, in) weights (q, k, v stacked),
    # no oneDNN-packed copies; oneDNN is switched back on after each product.
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: True)  # the path of such CPUs
    calls, gemv = [], fastpath.torch_gemv
    monkeypatch.setattr(fastpath, "torch_gemv", lambda *a: calls.append(1) or gemv(*a))
    cfg = GPTConfig.preset("nano", vocab_size=50, context_length=16, n_kv_head=2)
    attn = GPT(cfg).blocks[0].attn.to(torch.bfloat16)
    x = torch.randn(1, 1, cfg.n_embd).to(torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):  # second round: after an in-place change of one weight
            q, k, v = attn._project_qkv(x)
            assert derived_names(attn) == {"_qkv", "_qkv_bias"}
            for got, proj in ((q, attn.q_proj), (k, attn.k_proj), (v, attn.v_proj)):
                want = F.linear(x.float(), proj.weight.float(), proj.bias.float())
                torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
            attn.v_proj.weight.mul_(3)
        y = attn.o_proj(q)
        assert y.dtype == torch.bfloat16 and not derived_names(attn.o_proj)
        assert len(calls) == 3  # q/k/v twice, o_proj once
        assert torch.backends.mkldnn.is_available() == torch._C._get_mkldnn_enabled()


class ShiftedLinear(torch.nn.Module):
    """A wrapped projection (as LoRA wraps one): base(x) plus a learned shift."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base, self.calls = base, 0
        self.shift = torch.nn.Parameter(torch.randn(base.out_features) * 0.5)

    def forward(self, x):
        self.calls += 1
        return self.base(x) + self.shift


def test_batch1_decode_runs_a_wrapped_projection():
    model = build(n_kv_head=2)
    for block in model.blocks:
        block.attn.q_proj = ShiftedLinear(block.attn.q_proj)
        block.attn.v_proj = ShiftedLinear(block.attn.v_proj)
    x = ids(1, 8)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(batch_size=1, max_seq=8)
        steps = [model(x[:, :1], cache=cache, input_pos=torch.tensor([0]))]
        calls = model.blocks[0].attn.q_proj.calls
        for t in range(1, 8):  # one-row steps: where the fused q/k/v product would apply
            steps.append(model(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])))
    assert model.blocks[0].attn.q_proj.calls == calls + 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_shapes_and_errors():
    model = build(n_kv_head=1)
    cache = model.make_cache(batch_size=3)
    assert cache[0].k.shape == (3, 1, 32, 8) and len(cache) == 2
    with pytest.raises(UserError, match="context_length"):
        model.make_cache(batch_size=1, max_seq=33)
    with pytest.raises(UserError, match="input_pos"):
        model(ids(3, 2), cache=cache)
    with pytest.raises(UserError, match="crop"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ---- loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_matches_cross_entropy_and_ignores_padding(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1, 2:] = -100
    total, count = lm_loss_sum(logits, targets)
    assert total.dtype == torch.float32 and count.item() == 7
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 11), targets.view(-1))  # mean over real ones
    loss = lm_loss(logits, targets)
    assert torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    ref.backward()
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.float(), ref_logits.grad, atol=1e-2 if dtype is
                          torch.bfloat16 else 1e-7)
    assert logits.grad[1, 2:].abs().max() == 0  # ignored targets get no gradient
    model = build()
    x = ids()
    logits, loss = model(x, x)
    assert logits.shape == (2, 12, 61) and loss.item() == pytest.approx(math.log(61), rel=0.1)


def test_gradient_accumulation_equals_one_big_batch():
    model = build()
    x, y = ids(4, 10), ids(4, 10, seed=2)
    y[0, 3:] = -100
    y[3, :8] = -100  # micro-batches with very different numbers of real targets
    _, loss = model(x, y)
    loss.backward()
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_tokens = (y != -100).sum()  # counted over the whole global batch first
    for xb, yb in zip(x.split(1), y.split(1), strict=True):
        lm_loss(model(xb), yb, num_tokens=n_tokens).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, big[name], atol=1e-7, rtol=1e-5), name


def test_loss_goes_down_on_a_fixed_batch():
    model = build().train()
    x = ids(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- bf16 on the CPU: both paths, forced, on every machine ---------------------------------


def force_bf16_path(monkeypatch, native: bool) -> SimpleNamespace:
    """Force the CPU bf16 path (torch's own bf16 kernels, or exact fp32 GEMMs on bf16-rounded
    values) whatever this CPU has, and count the calls of the fp32 path's two kernels."""
    monkeypatch.setattr(fastpath, "cpu_has_native_bf16", lambda: native)
    calls = {"linear": 0, "sdpa": 0}
    linear_apply, sdpa = fastpath.Bf16LinearViaFp32.apply, attention.sdpa_via_fp32

    def counted_linear(*args):
        calls["linear"] += 1
        return linear_apply(*args)

    def counted_sdpa(*args):
        calls["sdpa"] += 1
        return sdpa(*args)

    monkeypatch.setattr(fastpath.Bf16LinearViaFp32, "apply", counted_linear)
    monkeypatch.setattr(attention, "sdpa_via_fp32", counted_sdpa)
    return SimpleNamespace(native=native, calls=calls)


@pytest.fixture(params=["native", "via_fp32"])
def bf16_path(request, monkeypatch) -> SimpleNamespace:
    """Each test runs once on each CPU bf16 path."""
    return force_bf16_path(monkeypatch, native=request.param == "native")


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, held in fp64: the operands a bf16 kernel multiplies."""
    return t.detach().to(torch.bfloat16).double()


def assert_bf16_rounding_of(y: torch.Tensor, exact: torch.Tensor) -> None:
    """y (bf16) is `exact` rounded to bf16 (within one unit in the last place: sum order)."""
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-6)


def test_bf16_linear_via_fp32_matches_the_definition(monkeypatch):
    """bf16 operands, products summed in fp32, one bf16 rounding of the output; gradients
    from the saved bf16 operands, unrounded (fp32)."""
    bf16_path = force_bf16_path(monkeypatch, native=False)
    torch.manual_seed(0)
    lin = Linear(96, 40)
    x = torch.randn(3, 5, 96, requires_grad=True)  # fp32: autocast rounds it
    g = torch.randn(3, 5, 40).to(torch.bfloat16)  # the gradient of a bf16 output is bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert bf16_path.calls["linear"] == 1
    xb, wb, bb = bf16_exact(x), bf16_exact(lin.weight), bf16_exact(lin.bias)
    assert_bf16_rounding_of(y, xb @ wb.T + bb)
    y.backward(g)
    g2 = g.double().reshape(-1, 40)
    for got, want in ((x.grad, (g2 @ wb).view(3, 5, 96)), (lin.weight.grad, g2.T @ xb.view(-1, 96)),
                      (lin.bias.grad, g2.sum(0))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # bf16 weights and input without autocast (a model loaded with --dtype bfloat16)
    lin16 = Linear(96, 40).to(torch.bfloat16)
    with torch.no_grad():
        y = lin16(x.detach().to(torch.bfloat16))
    assert bf16_path.calls["linear"] == 2
    assert_bf16_rounding_of(y, bf16_exact(x) @ bf16_exact(lin16.weight).T
                            + bf16_exact(lin16.bias))


def test_bf16_linear_native_is_torch_bf16(monkeypatch):
    """Where bf16 is native the Linear is torch's own bf16 linear, bit for bit, both ways."""
    bf16_path = force_bf16_path(monkeypatch, native=True)
    torch.manual_seed(0)
    lin = Linear(96, 40)
    x = torch.randn(3, 5, 96, requires_grad=True)
    g = torch.randn(3, 5, 40).to(torch.bfloat16)
    grads = []
    for fn in (lin, lambda t: F.linear(t, lin.weight, lin.bias)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.backward(g)
        grads.append((y, x.grad, lin.weight.grad, lin.bias.grad))
        x.grad = None
        lin.zero_grad(set_to_none=True)
    assert bf16_path.calls["linear"] == 0
    for ours, torchs in zip(*grads, strict=True):
        assert torch.equal(ours, torchs)
    # and torch's bf16 product is the definition up to its own rounding
    exact = bf16_exact(x) @ bf16_exact(lin.weight).T + bf16_exact(lin.bias)
    torch.testing.assert_close(grads[0][0].double(), exact, rtol=2**-6, atol=1e-3)


ATTN_CASES = {  # name: (n_kv_head, T, S, mask kind, causal)
    "causal": (4, 7, 7, None, True),
    "gqa-causal-prefix": (2, 3, 7, None, True),
    "additive-mask": (1, 7, 7, "additive", False),
    "bool-mask-causal": (4, 7, 7, "bool", True),
}


@pytest.mark.parametrize("case", ATTN_CASES)
def test_bf16_sdpa_both_paths(bf16_path, case):
    n_kv, T, S, kind, causal = ATTN_CASES[case]
    g = torch.Generator().manual_seed(0)
    q = 2 * torch.randn(2, 4, T, 8, generator=g)  # fp32 under autocast: rounded to bf16
    k, v = (2 * torch.randn(2, n_kv, S, 8, generator=g) for _ in range(2))
    keep = torch.rand(2, 1, T, S, generator=g) > 0.3
    keep[..., 0] = True  # every query sees some key
    mask = {None: None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, -math.inf)}[kind]
    # the definition in fp64 on bf16-rounded values
    qe, ke, ve = bf16_exact(q), bf16_exact(k), bf16_exact(v)
    ke, ve = (t.repeat_interleave(4 // n_kv, dim=1) for t in (ke, ve))
    visible = torch.ones(2, 1, T, S, dtype=torch.bool) if kind is None else keep
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    scores = (qe @ ke.transpose(-2, -1) / math.sqrt(8)).masked_fill(~visible, -math.inf)
    exact = torch.softmax(scores, dim=-1) @ ve
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sdpa_attention(q, k, v, mask, causal=causal)
    if bf16_path.native:
        assert bf16_path.calls["sdpa"] == 0
        if kind is None and T == S:  # bit for bit the call torch's own bf16 kernel makes
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torchs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            assert torch.equal(y, torchs)
        torch.testing.assert_close(y.double(), exact, rtol=2**-5, atol=2e-2)  # bf16 softmax
    else:
        assert bf16_path.calls["sdpa"] == 1
        assert_bf16_rounding_of(y, exact)


@pytest.mark.parametrize("case", ATTN_CASES)
def test_bf16_attention_as_gemms_matches_the_definition(monkeypatch, case):
    # Native bf16 CPUs run short sequences' and decode steps' attention as bf16 GEMMs + softmax
    # (forced here):
    # the output and the gradients are the fp64 definition's up to bf16 rounding.
    force_bf16_path(monkeypatch, native=True)
    n_kv, T, S, kind, causal = ATTN_CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(2, n_kv, S, 8, generator=g).bfloat16().requires_grad_() for _ in range(2))
    keep = torch.rand(2, 1, T, S, generator=g) > 0.3
    keep[..., 0] = True
    mask = {None: None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, -math.inf)}[kind]
    calls = []
    monkeypatch.setattr(attention, "explicit_attention",
                        lambda *a, **kw: calls.append(kw) or explicit_attention(*a, **kw))
    y = sdpa_attention(q, k, v, mask, causal=causal)
    assert calls and calls[0]["fp32_scores"] is False  # the GEMM path ran
    qe, ke, ve = (t.detach().double().requires_grad_() for t in (q, k, v))
    visible = torch.ones(2, 1, T, S, dtype=torch.bool) if kind is None else keep
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    kr, vr = (t.repeat_interleave(4 // n_kv, dim=1) for t in (ke, ve))
    scores = (qe @ kr.transpose(-2, -1) / math.sqrt(8)).masked_fill(~visible, -math.inf)
    exact = torch.softmax(scores, dim=-1) @ vr
    grad = torch.randn(exact.shape, generator=g, dtype=torch.float64)
    y.backward(grad.bfloat16())
    exact.backward(grad)
    torch.testing.assert_close(y.double(), exact, rtol=2**-5, atol=3e-2)
    for got, want in ((q, qe), (k, ke), (v, ve)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2**-4, atol=6e-2)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_bf16_autocast_training_step(bf16_path, pos):
    model = build(pos_encoding=pos, n_kv_head=2)
    x = ids()
    _, ref_loss = model(x, x)  # fp32 reference: logits, loss and gradients
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    n_linear = sum(isinstance(m, Linear) for m in model.modules())
    want = (0, 0) if bf16_path.native else (n_linear, model.config.n_layer)
    assert (bf16_path.calls["linear"], bf16_path.calls["sdpa"]) == want
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert (logits.float() - ref).abs().max() < 0.05  # bf16 rounding only
    assert abs(loss.item() - ref_loss.item()) < 0.01
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        # the fp32 gradient up to bf16 rounding (k_proj.bias's is 0: softmax ignores a shift)
        err, size = (p.grad - ref_grads[name]).norm(), ref_grads[name].norm()
        assert err < 0.05 * size + 1e-3, (name, err.item(), size.item())


# ---- save / load ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                                             bias=False, tie_embeddings=False, n_kv_head=2)])
def test_save_and_load_roundtrip(tmp_path, kw):
    model = build(**kw)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == model.config.tie_embeddings
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="config.json not found"):
        GPT.from_pretrained(tmp_path)
    build().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors not found"):
        GPT.from_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "n_layers": 2}))
    with pytest.raises(UserError, match="did you mean 'n_layer'"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT.from_pretrained(tmp_path)
