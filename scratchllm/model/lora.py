"""LoRA from scratch: low-rank adapters on Linear layers, injected by name from outside the model.

A plain module of the model layer (the GPT never knows about it), so that checkpoint loading can
rebuild an adapter run on its base for every consumer (generate, chat, evaluate, convert, serve),
and the fine-tuning recipes apply it the same way.

A targeted Linear W (out, in) becomes W + B @ A * scaling with A (rank, in) and B (out, rank):
only A and B train. B starts at zero, so a fresh adapter changes nothing; scaling is
alpha / rank (or alpha / sqrt(rank) with rsLoRA, which keeps updates the same size as the rank
grows). The wrapped layer keeps `weight` and `bias` under their own names (the same Parameter
objects), so base state dicts load unchanged and the adapter adds only `lora_A` / `lora_B`.

Patterns (targets, trainable, extra) are shell globs over dotted names; a pattern also matches
as a suffix, so "mlp.*" matches "blocks.0.mlp.up_proj" and "head.*" matches "head.weight".
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.errors import UserError
from scratchllm.model.fastpath import Bf16LinearViaFp32, slow_bf16_cpu
from scratchllm.model.layers import Linear, make_dropout

# Attention q/k/v/o and every MLP projection (gelu: up/down; swiglu: gate/up/down). Not lm_head
# (huge, and often tied to the embedding) and not a task head (train it fully: `trainable`).
DEFAULT_TARGETS = ["*.attn.q_proj", "*.attn.k_proj", "*.attn.v_proj", "*.attn.o_proj",
                   "*.mlp.*_proj"]


# ---- config --------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """The [lora] section: rank 0 turns LoRA off; targets are globs over Linear module names."""

    rank: int = 0  # 0 = off (full or partial fine-tuning instead)
    alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # on the LoRA branch's input only
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rslora: bool = False

    def check(self) -> None:
        """Raise UserError for a value out of range (unmatched targets fail in apply_lora)."""
        if isinstance(self.targets, str):  # --lora.targets=attn.q_proj,attn.v_proj
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise UserError(f"lora.rank = {self.rank!r} must be an integer >= 0 (0 turns LoRA "
                            "off; 4-16 is typical)")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha = {self.alpha!r} must be > 0 (e.g. 16, or 2 * rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout = {self.dropout!r} must be in [0, 1)")
        if not isinstance(self.targets, list) or not all(
                isinstance(t, str) and t for t in self.targets):
            raise UserError(f"lora.targets = {self.targets!r} must be a list of module-name "
                            f"patterns, e.g. {DEFAULT_TARGETS}")
        if self.rank > 0 and not self.targets:
            raise UserError("lora.targets is empty: name the Linear layers to adapt, e.g. "
                            f"{DEFAULT_TARGETS}")

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return lora_scaling(self.alpha, self.rank, self.rslora)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / rank (LoRA) or alpha / sqrt(rank) (rsLoRA)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


# ---- the layer -----------------------------------------------------------------------------


class LoRALinear(Linear):
    """A Linear plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * scaling."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameters: no copy, same state_dict keys
        self.register_parameter("bias", base.bias)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device,
                                               dtype=w.dtype))  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device,
                                               dtype=w.dtype))  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear) do
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.lora_dropout = make_dropout(dropout)
        self.merged = False
        self._base: tuple[int, Tensor] | None = None  # (weight version, weight before merge)
        self.train(base.training)  # a model in eval mode stays so (no dropout sneaking in)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # the base product, CPU fast paths included
        if self.merged:
            return y
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        return y + _linear(_linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., out)

    def delta_weight(self) -> Tensor:
        """The update B @ A * scaling (out, in), computed in fp32, in the weight's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, keep_base: bool = True) -> None:
        """Fold the update into the weight (forward then skips the branch).

        keep_base keeps a copy of the weight so that unmerge() restores it bit for bit; without
        it unmerge() subtracts the update again (exact up to rounding).
        """
        if self.merged:
            return
        base = self.weight.detach().clone() if keep_base else None
        self.weight.add_(self.delta_weight())
        self._base = None if base is None else (self.weight._version, base)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the weight again (the inverse of merge)."""
        if not self.merged:
            return
        if self._base is not None and self._base[0] == self.weight._version:
            self.weight.copy_(self._base[1])  # untouched since merge(): restore exactly
        else:
            self.weight.sub_(self.delta_weight())
        self._base, self.merged = None, False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"
                f"{', rslora' if self.rslora else ''}{', merged' if self.merged else ''}")


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T, through the fp32 route where bf16 GEMMs are slow (see model.fastpath)."""
    if slow_bf16_cpu(x):
        with torch.autocast("cpu", enabled=False):
            return Bf16LinearViaFp32.apply(x, w, None)
    return F.linear(x, w)


# ---- applying, freezing, saving ------------------------------------------------------------


def name_matches(name: str, pattern: str) -> bool:
    """True when the glob matches the whole dotted name or a suffix of it after a dot."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def select_names(names: Iterable[str], patterns: Sequence[str], what: str, kind: str
                 ) -> list[str]:
    """The names (in order) matched by any pattern; UserError for a pattern matching none."""
    names = list(names)
    for pattern in patterns:
        if not any(name_matches(n, pattern) for n in names):
            raise UserError(f"{what} pattern {pattern!r} matches no {kind}; the {kind}s are: "
                            f"{', '.join(_summary(names))}")
    return [n for n in names if any(name_matches(n, p) for p in patterns)]


def _summary(names: list[str]) -> list[str]:
    """Names with layer indices folded: blocks.0.attn.q_proj -> blocks.*.attn.q_proj."""
    out: dict[str, None] = {}
    for name in names:
        out[".".join("*" if part.isdigit() else part for part in name.split("."))] = None
    return list(out)


def shared_weight_owner(model: nn.Module, name: str) -> str | None:
    """Another name of module `name`'s weight Parameter (tied embeddings), or None."""
    weight = model.get_submodule(name).weight
    for other, p in model.named_parameters(remove_duplicate=False):
        if p is weight and other != f"{name}.weight":
            return other
    return None


def check_untied(model: nn.Module, name: str) -> None:
    """UserError when the Linear `name` shares its weight: merging would change both users."""
    other = shared_weight_owner(model, name)
    if other is not None:
        raise UserError(f"{name} shares its weight with {other} (tied embeddings): LoRA can't "
                        f"adapt it alone; leave it out of lora.targets")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` in place of the module there."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def has_lora(model: nn.Module) -> bool:
    """True when any module of the model is a LoRALinear."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model: nn.Module, cfg: LoraConfig, trainable: Sequence[str] = ()) -> list[str]:
    """Wrap the Linear layers matched by cfg.targets in LoRALinear (in place) and freeze all but
    the adapters and the parameters matched by `trainable` (e.g. ["head.*"]); returns the
    wrapped module names. rank 0 changes nothing and returns []."""
    cfg.check()
    if cfg.rank == 0:
        return []
    if has_lora(model):
        raise UserError("the model already has LoRA layers: apply LoRA once, to a plain model")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    names = select_names(linears, cfg.targets, "lora.targets", "Linear layer")
    check_trainable(model, trainable)  # every check before the first change: all or nothing
    for name in names:
        check_untied(model, name)
    for name in names:
        base = model.get_submodule(name)
        replace_module(model, name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout,
                                               cfg.rslora))
    freeze_all_but(model, trainable)
    return names


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA A and B of the model by state_dict name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{name}." if name else ""
            out[prefix + "lora_A"], out[prefix + "lora_B"] = m.lora_A, m.lora_B
    return out


def check_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    """UserError for a `trainable` pattern that matches no parameter name."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    select_names(names, trainable, "trainable", "parameter")


def freeze_all_but(model: nn.Module, trainable: Sequence[str] = ()) -> None:
    """requires_grad only for LoRA A/B and the parameters whose names match `trainable`."""
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights: every name
    keep = {id(p) for p in lora_parameters(model).values()}
    chosen = set(select_names([n for n, _ in named], trainable, "trainable", "parameter"))
    keep |= {id(p) for n, p in named if n in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)


def lora_state_dict(model: nn.Module, extra: Sequence[str] = ()) -> dict[str, Tensor]:
    """Only the adapter: every LoRA A/B plus the state_dict entries matching `extra` (e.g. the
    task head, ["head.*"]); what a LoRA run saves."""
    state = model.state_dict(keep_vars=True)
    wanted = set(lora_parameters(model)) | set(select_names(state, extra, "extra", "tensor"))
    return {k: v.detach() for k, v in state.items() if k in wanted}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an adapter-only state dict into a model with LoRA applied, checking names/shapes."""
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(lora_parameters(model)) - set(state))
    if unknown or missing:
        raise UserError(f"the adapter does not fit this model (unexpected {unknown[:3]}, "
                        f"missing {missing[:3]}): apply the [lora] settings it was trained with")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise UserError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model "
                            f"expects {tuple(own[key].shape)}: check lora.rank and the base")
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding the merged weight (in place)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        if m.merged:
            m._base = None  # the merged weight is what we keep
        else:
            m.merge(keep_base=False)
        with torch.device("meta"):  # no allocation: the Parameters below replace these
            plain = Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.weight = m.weight
        plain.train(m.training)
        if m.bias is not None:
            plain.bias = m.bias
        replace_module(model, name, plain)
    return model


# ---- counting ------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, a tied weight counted once."""
    params = list(model.parameters())  # deduplicated
    return (sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


def format_parameter_counts(total: int, trainable: int) -> str:
    """'trainable: 1,234 of 56,789 (2.17%)'."""
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable: {trainable:,} of {total:,} ({share:.2f}%)"
