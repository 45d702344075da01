"""LoRA: zero-init identity, freezing, merge/unmerge, adapter-only state, and PEFT parity."""

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from scratchllm.config import Sections, load_config
from scratchllm.errors import UserError
from scratchllm.finetune.peft import export_peft, import_peft
from scratchllm.model import GPT, GPTConfig
from scratchllm.model.layers import Linear
from scratchllm.model.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    format_parameter_counts,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)

V = 61
TOL = 1e-4  # against transformers / peft
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2,
             mlp_hidden=48, rope_theta=300.0, tie_embeddings=False)


def tiny(seed: int = 0, **kw) -> GPT:
    """A 2-layer GPT-2-style model (LLaMA-style with **LLAMA), weights moved off their init."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, context_length=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(GPTConfig(**{**cfg, **kw})).eval()
    g = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (and fresh A) in every adapter, so the update really counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(0.3 * torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))


def tokens(n: int = 3, t: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(3))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- the layer and apply_lora --------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), LLAMA])
def test_fresh_adapter_changes_nothing_and_keeps_base_names(kw):
    model = tiny(**kw)
    x = tokens()
    ref = logits(model, x)
    keys, weights = set(model.state_dict()), {n: p for n, p in model.named_parameters()}
    names = apply_lora(model, LoraConfig(rank=4))
    mlp = ["up_proj", "down_proj"] if not kw else ["gate_proj", "up_proj", "down_proj"]
    assert names == [f"blocks.{i}.{part}" for i in range(2)
                     for part in [f"attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}" for n in mlp]]
    assert torch.equal(logits(model, x), ref)  # B = 0: exactly the base
    lora_keys = {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert set(model.state_dict()) == keys | lora_keys  # base names unchanged
    for name, p in model.named_parameters():  # the same Parameter objects, no copies
        if name in weights:
            assert p is weights[name]
    layer = model.get_submodule(names[0])
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (32, 4)
    assert layer.lora_A.abs().sum() > 0 and not layer.lora_B.any()


def test_only_adapters_and_chosen_params_train():
    model = tiny(tie_embeddings=False)
    apply_lora(model, LoraConfig(rank=2, targets=["attn.q_proj", "attn.v_proj"]),
               trainable=["lm_head.*"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lm_head.weight"} | {f"blocks.{i}.attn.{n}_proj.lora_{ab}"
                                              for i in range(2) for n in "qv" for ab in "AB"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all, on purpose
    model.train()
    x = tokens()
    for _ in range(2):  # step 1 moves B (A's gradient is 0 while B = 0), step 2 moves A too
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), name


def test_merge_unmerge_and_merge_lora():
    model = tiny()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    randomize(model)
    x = tokens()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = logits(model, x)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.merge()
    assert max_diff(logits(model, x), ref) <= 1e-5
    for m in layers:
        m.unmerge()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # exactly
    for m in layers:
        m.merge(keep_base=False)
        m.unmerge()
    assert all(max_diff(p, base[n]) <= 1e-6 for n, p in model.named_parameters())
    assert max_diff(logits(model, x), ref) <= 1e-5

    plain_keys = set(tiny().state_dict())
    merged = merge_lora(model)
    assert merged is model and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model.get_submodule(f"blocks.0.attn.{n}_proj")) is Linear for n in "qkvo")
    assert set(model.state_dict()) == plain_keys
    assert max_diff(logits(model, x), ref) <= 1e-5
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives


def test_adapter_state_dict_is_small_and_loads_back():
    model = tiny(tie_embeddings=False)
    base = copy.deepcopy(model)
    names = apply_lora(model, LoraConfig(rank=2), trainable=["lm_head.*"])
    randomize(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # the trained "head"
    state = lora_state_dict(model, extra=["lm_head.*"])
    assert set(state) == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"lm_head.weight"}
    adapter = sum(t.numel() for k, t in state.items() if k != "lm_head.weight")
    total, _ = count_parameters(base)
    assert adapter < 0.1 * total
    assert sum(t.nbytes for t in state.values()) < 0.35 * sum(
        t.nbytes for t in model.state_dict().values())

    apply_lora(base, LoraConfig(rank=2), trainable=["lm_head.*"])
    load_lora_state_dict(base, state)
    assert torch.equal(logits(base, tokens()), logits(model, tokens()))
    with pytest.raises(UserError, match="missing"):
        load_lora_state_dict(base, {k: v for k, v in state.items() if "blocks.1" not in k})
    fresh = tiny(tie_embeddings=False)
    apply_lora(fresh, LoraConfig(rank=3), trainable=["lm_head.*"])
    with pytest.raises(UserError, match="shape"):
        load_lora_state_dict(fresh, state)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling(rslora):
    layer = Linear(8, 6)
    lora = LoRALinear(layer, rank=4, alpha=8.0, rslora=rslora)
    assert lora.scaling == (4.0 if rslora else 2.0)
    assert LoraConfig(rank=4, alpha=8.0, rslora=rslora).scaling == lora.scaling
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 8)
    expected = layer(x) + x @ lora.lora_A.T @ lora.lora_B.T * lora.scaling
    assert max_diff(lora(x).detach(), expected.detach()) <= 1e-5


def test_lora_dropout_only_in_training():
    model = tiny()
    apply_lora(model, LoraConfig(rank=4, dropout=0.5))
    randomize(model)
    x = tokens()
    assert torch.equal(logits(model, x), logits(model, x))
    model.train()
    assert not torch.equal(logits(model, x), logits(model, x))


def test_counts_and_rank_zero():
    model = tiny()
    total, trainable = count_parameters(model)
    assert total == trainable == model.num_params()
    assert apply_lora(model, LoraConfig()) == []  # rank 0: LoRA off, nothing frozen
    assert count_parameters(model) == (total, total)
    names = apply_lora(model, LoraConfig(rank=2, targets=["blocks.0.attn.q_proj"]))
    assert names == ["blocks.0.attn.q_proj"]
    assert count_parameters(model) == (total + 2 * 2 * 32, 2 * 2 * 32)
    assert format_parameter_counts(1000, 25) == "trainable: 25 of 1,000 (2.50%)"


def test_bad_config_and_patterns():
    for bad, match in [(dict(rank=-1), "lora.rank"), (dict(rank=1.5), "lora.rank"),
                       (dict(alpha=0.0), "lora.alpha"), (dict(dropout=1.0), "lora.dropout"),
                       (dict(rank=4, targets=[]), "lora.targets"),
                       (dict(targets=[3]), "lora.targets")]:
        with pytest.raises(UserError, match=match):
            LoraConfig(**bad).check()
    assert LoraConfig(targets="attn.q_proj, mlp.*").check() is None
    model = tiny()
    with pytest.raises(UserError, match=r"'attn\.qkv' matches no Linear.*blocks\.\*\.attn\.q_proj"):
        apply_lora(model, LoraConfig(rank=2, targets=["attn.qkv"]))
    with pytest.raises(UserError, match="'head.*' matches no parameter"):
        apply_lora(model, LoraConfig(rank=2), trainable=["head.*"])
    with pytest.raises(UserError, match="tied embeddings"):
        apply_lora(model, LoraConfig(rank=2, targets=["lm_head"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # all or nothing
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(UserError, match="matches no tensor"):
        lora_state_dict(model, extra=["head.*"])


def test_lora_is_a_config_section():
    @dataclass
    class Schema(Sections):
        lora: LoraConfig = field(default_factory=LoraConfig)

    cfg = load_config(None, ["--lora.rank=8", "--lora.alpha=32", "--lora.rslora=true"], Schema)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora) == (8, 32.0, True)
    assert cfg.lora.targets == DEFAULT_TARGETS and cfg.lora.scaling == 32 / math.sqrt(8)
    with pytest.raises(UserError, match="lora.dropout"):
        load_config(None, ["--lora.dropout=1.5"], Schema)


# ---- PEFT interop --------------------------------------------------------------------------


@pytest.mark.parametrize("kw, targets, rslora", [
    (dict(), DEFAULT_TARGETS, False),
    (dict(tie_embeddings=False), ["attn.q_proj", "attn.v_proj", "lm_head"], True),
    (LLAMA, [*DEFAULT_TARGETS, "lm_head"], False),
])
def test_export_loads_in_peft_with_same_logits(tmp_path, kw, targets, rslora):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from scratchllm.model.convert import to_hf

    model = tiny(**kw)
    apply_lora(model, LoraConfig(rank=3, alpha=5.0, targets=targets, rslora=rslora))
    randomize(model)
    with torch.no_grad():  # different scalings on q and v: the fused c_attn must still fit
        model.blocks[1].attn.q_proj.scaling *= 0.5
    to_hf(model, tmp_path / "base")
    export_peft(model, tmp_path / "adapter", hf_model_name_or_path=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    x = tokens()
    base_logits = logits(hf, x)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = logits(model, x)
    assert max_diff(ours, logits(hf, x)) <= TOL
    assert max_diff(ours, base_logits) > 100 * TOL  # the adapter really counts

    # And back: the export imports onto the plain model as the same adapters, exactly.
    back = tiny(**kw)
    names = import_peft(back, tmp_path / "adapter")
    assert names == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        a, b = model.get_submodule(name), back.get_submodule(name)
        assert a.rank == b.rank and torch.equal(a.lora_A, b.lora_A)
        assert max_diff(a.lora_B * a.scaling, b.lora_B * b.scaling) <= 1e-6
    assert max_diff(logits(back, x), ours) <= 1e-5


def hf_model(kind: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=None, eos_token_id=None)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 500.0})
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_adapter_made_by_peft(tmp_path, kind):
    peft = pytest.importorskip("peft")
    from scratchllm.model.convert import from_hf

    hf = hf_model(kind)
    ours = from_hf(copy.deepcopy(hf))
    if kind == "gpt2":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                 fan_in_fan_out=True)
    else:  # per-module ranks and alphas, rsLoRA
        config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"],
                                 rank_pattern={"layers.1.mlp.up_proj": 2},
                                 alpha_pattern={"o_proj": 3.0})
    model = peft.get_peft_model(hf, config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path)

    x = tokens()
    plain = logits(ours, x)
    names = import_peft(ours, tmp_path, trainable=["norm_f.*"])
    assert max_diff(logits(ours, x), logits(model, x)) <= TOL
    assert max_diff(logits(ours, x), plain) > 100 * TOL  # the adapter really counts
    expected = 2 * (6 if kind == "gpt2" else 7)  # c_attn comes back as q, k and v
    assert len(names) == expected
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"norm_f.weight"} | \
        ({"norm_f.bias"} if kind == "gpt2" else set())
    if kind == "llama":
        assert ours.blocks[1].mlp.up_proj.rank == 2 and ours.blocks[0].mlp.up_proj.rank == 4


def test_peft_interop_errors(tmp_path):
    model = tiny()
    with pytest.raises(UserError, match="no LoRA layers"):
        export_peft(model, tmp_path)
    with pytest.raises(UserError, match="adapter_config.json not found"):
        import_peft(model, tmp_path)
    apply_lora(model, LoraConfig(rank=2))
    model.blocks[0].attn.q_proj.merge()
    with pytest.raises(UserError, match="unmerge"):
        export_peft(model, tmp_path)
    model.blocks[0].attn.q_proj.unmerge()
    export_peft(model, tmp_path)
    with pytest.raises(UserError, match="already has LoRA"):
        import_peft(model, tmp_path)
    with pytest.raises(UserError, match="does not have"):  # a GPT-2 adapter onto a LLaMA
        import_peft(tiny(**LLAMA), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(UserError, match="only LoRA"):
        import_peft(tiny(), tmp_path)
    head = tiny()
    head.head = Linear(32, 2)  # a task head has no Hugging Face counterpart
    apply_lora(head, LoraConfig(rank=2, targets=["head"]))
    with pytest.raises(UserError, match="no counterpart"):
        export_peft(head, tmp_path)
