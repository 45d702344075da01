"""Parity with Hugging Face transformers: same weights, same logits, both directions."""

import contextlib
import logging
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from scratchllm.errors import UserError
from scratchllm.model import GPT, GPTConfig
from scratchllm.model.convert import from_hf, to_hf

TOL = 1e-4
V = 61


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (norm weights of 1, zero biases) so all of them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def hf_gpt2(tie: bool = True, activation: str = "gelu_new") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie,
                     activation_function=activation)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb(model, 1)
    return model


def hf_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=None,
                      eos_token_id=None, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 500.0})
    model = LlamaForCausalLM(cfg).eval()
    _perturb(model, 2)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (3, 12), a left-padding mask and a right-padding mask."""
    x = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(3))
    left, right = torch.ones_like(x), torch.ones_like(x)
    left[0, :5], left[2, :2] = 0, 0
    right[0, 7:], right[1, 10:] = 0, 0
    return x, left, right


def assert_same_logits(ours: GPT, hf: torch.nn.Module) -> None:
    """Equal logits without a mask, with left padding and with right padding (real tokens)."""
    x, left, right = batch()
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
        assert diff <= TOL, diff
        for mask in (left, right):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # HF takes positions from the caller
            a = ours(x, attention_mask=mask)
            b = hf(x, attention_mask=mask, position_ids=pos).logits
            real = mask.bool()
            diff = (a[real] - b[real]).abs().max().item()
            assert diff <= TOL, diff


@contextlib.contextmanager
def no_transformers_warnings():
    """Fail on any warning transformers logs or raises (missing / unexpected keys and so on)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught
                                                    if "transformers" in w.filename]
    assert not messages, messages


def load_hf(path) -> torch.nn.Module:
    with no_transformers_warnings():
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


# ---- import --------------------------------------------------------------------------------


@pytest.mark.parametrize("tie, activation, mlp", [(True, "gelu_new", "gelu"),
                                                  (False, "gelu_pytorch_tanh", "gelu"),
                                                  (True, "gelu", "gelu_exact")])
def test_import_gpt2_matches_hf(tie, activation, mlp):
    hf = hf_gpt2(tie, activation)
    ours = from_hf(hf)
    assert ours.config.pos_encoding == "learned" and ours.config.tie_embeddings == tie
    assert ours.config.mlp == mlp
    assert_same_logits(ours, hf)


@pytest.mark.parametrize("tie", [False, True])
def test_import_llama_gqa_matches_hf(tie):
    hf = hf_llama(tie)
    ours = from_hf(hf)
    cfg = ours.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.rope_theta, cfg.bias) == (4, 2, 500.0, False)
    assert_same_logits(ours, hf)
    assert_same_logits(from_hf(hf, attention="explicit"), hf)


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama])
def test_import_from_saved_directory(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path)
    assert_same_logits(from_hf(tmp_path), hf)
    assert_same_logits(from_hf(str(tmp_path)), hf)


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama])
def test_kv_cache_decoding_matches_hf_full_forward(make):
    hf = make()
    ours = from_hf(hf)
    x, _, _ = batch()
    with torch.no_grad():
        ref = hf(x).logits
        cache = ours.make_cache(batch_size=3, max_seq=16)
        out = [ours(x[:, :4], cache=cache, input_pos=torch.arange(4))]
        out += [ours(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(4, 12)]
    assert (torch.cat(out, dim=1) - ref).abs().max().item() <= TOL


def test_import_sharded_and_legacy_checkpoints(tmp_path):
    from safetensors.torch import save_file

    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(from_hf(tmp_path / "sharded"), hf)
    # OpenAI's original layout: no "transformer." prefix, causal-mask buffers.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    hf.config.to_json_file(legacy / "config.json")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}  # tied to wte
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(state, legacy / "model.safetensors")
    assert_same_logits(from_hf(legacy), hf)


def test_pickled_weights_are_refused(tmp_path):
    hf = hf_gpt2()
    hf.config.to_json_file(tmp_path / "config.json")
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pickle file.*safe_serialization=True"):
        from_hf(tmp_path)


def test_import_rejects_unsupported(tmp_path):
    cfg = GPT2Config(vocab_size=V, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                     activation_function="relu", bos_token_id=None, eos_token_id=None)
    with pytest.raises(UserError, match="activation 'relu'"):
        from_hf(GPT2LMHeadModel(cfg))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="'bert' is not supported"):
        from_hf(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        from_hf(tmp_path / "missing")


# ---- export --------------------------------------------------------------------------------


def ours(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, context_length=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    _perturb(model, seed + 10)
    return model


LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2,
             mlp_hidden=48, rope_theta=300.0)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(bias=False),
                                dict(mlp="gelu_exact"), LLAMA,
                                {**LLAMA, "tie_embeddings": False, "n_kv_head": 1},
                                {**LLAMA, "bias": True}])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kw):
    model = ours(**kw)
    to_hf(model, tmp_path)
    hf = load_hf(tmp_path)
    assert type(hf).__name__ == ("LlamaForCausalLM" if "norm" in kw else "GPT2LMHeadModel")
    assert_same_logits(model, hf)
    back = from_hf(tmp_path)  # and the round trip is lossless
    if kw == dict(bias=False):  # GPT-2 always has biases: they come back as exact zeros
        assert back.blocks[0].attn.q_proj.bias.abs().max() == 0
        assert_same_logits(back, hf)
        return
    assert back.config == model.config
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_export_rejects_models_without_hf_twin(tmp_path):
    with pytest.raises(UserError, match="no Hugging Face architecture"):
        to_hf(ours(pos_encoding="alibi"), tmp_path)
    with pytest.raises(UserError, match="grouped-query"):
        to_hf(ours(n_kv_head=2), tmp_path)
