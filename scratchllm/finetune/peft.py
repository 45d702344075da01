"""LoRA adapters in and out of Hugging Face PEFT's format (adapter_config.json +
adapter_model.safetensors), for the GPT-2 and LLaMA models that model.convert maps.

LLaMA's projections map one to one. GPT-2 fuses q/k/v into one c_attn (a Conv1D; PEFT's A and B
keep nn.Linear's layout there too, fan_in_fan_out only affects merging), so our three adapters
export as one exact c_attn adapter: A = [A_q; A_k; A_v] (3r, C) and a block-diagonal B (3C, 3r),
with PEFT's per-module rank_pattern / alpha_pattern keeping the scaling. On import, a c_attn
adapter goes back onto q, k and v as row slices of B with the columns each slice uses (a dense
PEFT adapter keeps all of A on each; one we exported gets its own rank-r blocks back). Both are
exact; only training-time dropout differs (PEFT draws one mask for the fused input).
"""

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.fileio import atomic_write_bytes, atomic_write_text, read_json_object
from scratchllm.model.config import GELU_MLPS
from scratchllm.model.lora import (
    LoRALinear,
    check_trainable,
    check_untied,
    freeze_all_but,
    has_lora,
    lora_scaling,
    replace_module,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix inside adapter_model.safetensors

# (ours inside blocks.i, theirs inside the HF layer)
_GPT2 = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
         "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_LLAMA = {**{f"attn.{n}_proj": f"self_attn.{n}_proj" for n in "qkvo"},
          **{f"mlp.{n}_proj": f"mlp.{n}_proj" for n in ("gate", "up", "down")}}


def _family(model: nn.Module) -> str:
    """'gpt2' or 'llama': the HF architecture that model.convert.to_hf writes for this model."""
    cfg = getattr(model, "config", None)
    kind = (getattr(cfg, "pos_encoding", None), getattr(cfg, "norm", None),
            getattr(cfg, "mlp", None))
    if kind[:2] == ("learned", "layernorm") and kind[2] in GELU_MLPS:
        return "gpt2"
    if kind == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise UserError("PEFT interop needs a GPT-2 style (learned, layernorm, gelu) or LLaMA style "
                    "(rope, rmsnorm, swiglu) GPT, the two that model.convert maps")


def hf_module_name(family: str, name: str) -> str | None:
    """The HF module that our Linear `name` becomes in to_hf's export, or None."""
    if name == "lm_head":
        return "lm_head"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    table, layers = (_GPT2, "transformer.h") if family == "gpt2" else (_LLAMA, "model.layers")
    if m is None or m[2] not in table:
        return None
    return f"{layers}.{m[1]}.{table[m[2]]}"


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of `key`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _save_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))


# ---- export --------------------------------------------------------------------------------


def export_peft(model: nn.Module, out_dir: str | os.PathLike,
                hf_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter for the model that to_hf writes."""
    family = _family(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise UserError("the model has no LoRA layers to export: apply_lora (or import_peft) "
                        "first")
    groups: dict[str, list[tuple[str, LoRALinear]]] = {}
    for name, m in layers.items():
        if m.merged:
            raise UserError(f"{name} is merged: unmerge() it before export (the adapter goes "
                            "beside the base weights, not into them)")
        hf = hf_module_name(family, name)
        if hf is None:
            raise UserError(f"{name} has no counterpart in Hugging Face's {family} model: "
                            "leave it out of lora.targets to export a PEFT adapter")
        groups.setdefault(hf, []).append((name, m))
    rslora = {m.rslora for m in layers.values()}
    if len(rslora) > 1:
        raise UserError("the adapters mix LoRA and rsLoRA scaling: PEFT holds one of them")
    use_rslora = rslora.pop()
    dropout = next((m.lora_dropout.p for m in layers.values() if m.lora_dropout is not None), 0.0)

    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for hf, members in groups.items():
        A, B, scaling = _fuse(model, hf, members)
        rank = A.shape[0]
        first = members[0][1]
        if lora_scaling(first.alpha, rank, use_rslora) == scaling:
            alphas[hf] = first.alpha
        else:  # the alpha that gives PEFT's module our scaling at its (fused) rank
            alphas[hf] = scaling * (math.sqrt(rank) if use_rslora else rank)
        ranks[hf] = rank
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = A
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = B
    r, alpha = Counter(zip(ranks.values(), alphas.values(), strict=True)).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": hf_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": sorted(groups), "bias": "none",
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    out = Path(out_dir)
    _save_safetensors(out / WEIGHTS_NAME, tensors)
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out


def _fuse(model: nn.Module, hf: str, members: list[tuple[str, LoRALinear]]
          ) -> tuple[Tensor, Tensor, float]:
    """(A, B, scaling) of one HF module from our adapters on the row slices of its output."""
    if not hf.endswith(".attn.c_attn"):  # one to one
        m = members[0][1]
        return m.lora_A.detach(), m.lora_B.detach(), m.scaling
    # GPT-2's c_attn: its output rows are q, k, v in that order (as to_hf concatenates them).
    attn = model.get_submodule(members[0][0].rpartition(".")[0])
    rows, start = {}, 0
    for n in "qkv":
        rows[f"{n}_proj"] = start
        start += getattr(attn, f"{n}_proj").out_features
    scaling = members[0][1].scaling
    A = torch.cat([m.lora_A.detach() for _, m in members])  # (R, C), R = sum of the ranks
    B = A.new_zeros(start, A.shape[0])  # (3C, R), block-diagonal
    col = 0
    for name, m in members:
        row = rows[name.rpartition(".")[2]]
        block = m.lora_B.detach()
        if m.scaling != scaling:  # one scaling per PEFT module: fold the ratio into B
            block = block * (m.scaling / scaling)
        B[row:row + m.out_features, col:col + m.rank] = block
        col += m.rank
    return A, B, scaling


# ---- import --------------------------------------------------------------------------------


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """The adapter config and its A/B weights by HF module name."""
    hint = "point at a directory written by PEFT's save_pretrained (or export_peft)"
    config = read_json_object(path / CONFIG_NAME, hint)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path} holds a {config.get('peft_type')!r} adapter: only LoRA imports")
    for key in ("use_dora", "lora_bias", "modules_to_save", "layer_replication",
                "trainable_token_indices", "target_parameters"):
        if config.get(key):
            raise UserError(f"{path}: adapters with {key} are not supported: plain LoRA only")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: adapters that train biases (bias={config['bias']!r}) are not "
                        "supported: plain LoRA only")
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise UserError(f"{file} not found (pickled adapter_model.bin is refused: safetensors "
                        "only): re-save the adapter with safe_serialization")
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors has its own error types for corrupt files
        raise UserError(f"{file} is not a readable safetensors file ({e})") from e
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise UserError(f"{file}: unsupported adapter tensor {key} (only LoRA A/B of Linear "
                            "layers import)")
        modules.setdefault(m[1], {})[m[2]] = value
    for hf, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{file}: {hf} has lora_A or lora_B but not both: re-save it")
    return config, modules


def import_peft(model: nn.Module, adapter_dir: str | os.PathLike,
                trainable: Sequence[str] = ()) -> list[str]:
    """Apply a PEFT LoRA adapter (for the HF GPT-2 / LLaMA model this one maps to) in place,
    freezing as apply_lora does; returns the wrapped module names."""
    path = Path(adapter_dir)
    family = _family(model)
    config, modules = _read_adapter(path)
    if has_lora(model):
        raise UserError("the model already has LoRA layers: import an adapter onto a plain "
                        "model")
    ours: dict[str, list[str]] = {}  # HF module -> our Linear names (q, k, v for c_attn)
    for name, m in model.named_modules():
        hf = hf_module_name(family, name) if isinstance(m, nn.Linear) else None
        if hf is not None:
            ours.setdefault(hf, []).append(name)
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    plan: list[tuple[str, Tensor, Tensor, int, float]] = []  # name, A, B, rank, alpha
    for hf, ab in sorted(modules.items()):
        if hf not in ours:
            raise UserError(f"the adapter adapts {hf}, which this {family} model does not have: "
                            "import it onto the model it was trained for")
        names = ours[hf]
        A, B = ab["A"], ab["B"]  # (R, in), (out, R)
        rank = A.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, hf,
                                     config.get("lora_alpha", 8)))
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        layers = [model.get_submodule(n) for n in names]
        outs = [m.out_features for m in layers]
        if A.shape != (rank, layers[0].in_features) or B.shape != (sum(outs), rank):
            raise UserError(f"{hf}: adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not "
                            "fit this model: import it onto the model it was trained for")
        fresh = not bool(B.ne(0).any())
        for name, B_i in zip(names, B.split(outs), strict=True):
            cols = torch.arange(rank)
            if len(names) > 1 and not fresh:  # keep only the columns of A this slice uses
                cols = B_i.ne(0).any(0).nonzero().flatten()
                if cols.numel() == 0:
                    continue  # no update on this projection
            r = cols.numel()
            a = alpha if r == rank else scaling * (math.sqrt(r) if rslora else r)
            plan.append((name, A[cols], B_i[:, cols], r, a))
    check_trainable(model, trainable)  # every check before the first change
    for name, *_ in plan:
        check_untied(model, name)
    wrapped = []
    for name, A, B, rank, alpha in plan:
        layer = LoRALinear(model.get_submodule(name), rank, alpha, dropout, rslora)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        replace_module(model, name, layer)
        wrapped.append(name)
    freeze_all_but(model, trainable)
    order = [n for n, _ in model.named_modules()]
    return sorted(wrapped, key=order.index)
