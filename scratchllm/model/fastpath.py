"""Fast paths for Linear and attention: bf16 without native bf16 matmuls, decode steps on the
CPU, and tensor-core-friendly output widths on CUDA.

Kept apart from the layers so that the layers read as plain PyTorch. Each path computes what
the plain op computes (up to summation order) and steps aside wherever it does not apply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchllm.runtime import cpu_has_native_bf16


def slow_bf16_cpu(x: Tensor) -> bool:
    """True when x is (or autocasts to) bf16 on a CPU without native bf16 matmuls."""
    # Called by every Linear: the common fp32 answer costs two attribute reads and one query
    # (x.device would build a torch.device object each time).
    if not x.is_cpu:
        return False
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    return bf16 and not cpu_has_native_bf16()


def bf16_exact(t: Tensor) -> Tensor:
    """Round to bf16 and hold the result in fp32 (exactly representable)."""
    return t.to(torch.bfloat16).float()


class Bf16LinearViaFp32(torch.autograd.Function):
    """A bf16 linear layer (bf16 inputs, fp32 accumulation, bf16 output) run on fp32 GEMMs.

    Without AVX512-BF16/AMX, torch's bf16 GEMM is a reference loop 10-20x slower than fp32 MKL.
    A product of two bf16 numbers is exact in fp32, so fp32 GEMMs on bf16-rounded operands give
    what a native bf16 GEMM gives (up to summation order); activations are saved in bf16, as
    under autocast. Gradients are left unrounded (fp32): at least as precise as autocast's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)  # what autocast would keep: bf16 input and weight copies
        ctx.has_bias = b is not None
        bias = bf16_exact(b) if b is not None else None
        return F.linear(xb.float(), wb.float(), bias).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        xb, wb = ctx.saved_tensors
        g2 = g.reshape(-1, wb.shape[0]).float()  # (M, N); g is bf16: the output was bf16
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ wb.float()).view(xb.shape)  # (..., K)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ xb.reshape(-1, xb.shape[-1]).float()  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb  # autograd casts each to its input's dtype


class _Derived(dict):
    """derived_tensor's results on one module, {name: (key, tensor)}. Never copied: deepcopy
    and pickle give an empty one (a packed oneDNN tensor cannot be copied; a copy of the
    module rebuilds what it needs on first use)."""

    def __deepcopy__(self, memo: dict) -> _Derived:
        return _Derived()

    def __reduce__(self):
        return _Derived, ()


def derived_tensor(owner: nn.Module, name: str, sources: tuple[Tensor, ...],
                   build: Callable[[], Tensor]) -> Tensor | None:
    """build() cached for `owner` until one of `sources` changes; None for inference tensors.

    Keyed on each source's identity, storage, in-place version and dtype, so a result is never
    stale (an optimizer step, load_state_dict, `.to(dtype)` or a new Parameter rebuild it).
    Inference tensors have no version counter: None.
    """
    if any(t.is_inference() for t in sources):
        return None
    key = tuple((id(t), t.data_ptr(), t._version, t.dtype) for t in sources)
    cache = owner.__dict__.get("_derived")  # a plain attribute: never in state_dict()
    if cache is None:
        cache = owner.__dict__["_derived"] = _Derived()
    cached = cache.get(name)  # (key, tensor)
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, build())
        cache[name] = cached
    return cached[1]


def derived_names(owner: nn.Module) -> set[str]:
    """The names of the tensors derived_tensor holds for `owner` (for tests)."""
    return set(owner.__dict__.get("_derived", {}))


FEW_ROWS = 16  # up to this many rows a product is a decode step (batch 1 to 16)
# CUDA GEMMs run their fastest tensor-core kernels only when a row of the output is a multiple
# of 8 elements long (16 bytes); GPT-2's 50,257-token vocabulary is not, which slows lm_head,
# about a quarter of a GPT-2 small's FLOPs (nanoGPT pads the vocabulary to 50,304 for this).
CUDA_OUTPUT_ALIGN = 64


def padded_output_linear(x: Tensor, weight: Tensor, bias: Tensor | None, multiple: int) -> Tensor:
    """F.linear(x, weight, bias) computed with weight's rows zero-padded to a multiple of
    `multiple`: the extra output columns are cut off again (a strided view), so the result and
    the gradients are F.linear's, and the parameters keep their shape."""
    pad = -weight.shape[0] % multiple
    y = F.linear(x, F.pad(weight, (0, 0, 0, pad)), None if bias is None else F.pad(bias, (0, pad)))
    return y[..., :weight.shape[0]]


def fast_linear(layer: nn.Linear, x: Tensor) -> Tensor | None:
    """layer(x) by a fast path, or None where the plain F.linear is the right call."""
    if x.is_cuda:
        # (not for a tensor-parallel DTensor weight: padding would regather its shards)
        if layer.out_features % CUDA_OUTPUT_ALIGN and type(layer.weight) in _PLAIN:
            return padded_output_linear(x, layer.weight, layer.bias, CUDA_OUTPUT_ALIGN)
        return None
    if slow_bf16_cpu(x):
        with torch.autocast("cpu", enabled=False):
            return Bf16LinearViaFp32.apply(x, layer.weight, layer.bias)
    if not decode_step(x, layer.weight):
        return None
    if one_bf16_row(x):
        return torch_gemv(x, layer.weight, layer.bias)
    if one_row_small(x, layer.weight.numel()):
        # One row times a small fp32 weight: MKL streams an (in, out) copy (axpy on long rows)
        # faster than our (out, in) one when out >= in; otherwise plain is right.
        if layer.out_features < layer.in_features:
            return None
        w = layer.weight
        weight_t = derived_tensor(layer, "_weight_t", (w,), lambda: w.detach().t().contiguous())
        return None if weight_t is None else transposed_product(x, weight_t, layer.bias)
    packed = packed_weight(layer, "_packed", (layer.weight,))
    return None if packed is None else packed_product(x, packed, layer.bias)


def one_bf16_row(x: Tensor) -> bool:
    """x is one bf16 row (a batch-1 decode step): torch_gemv's case."""
    return x.numel() == x.shape[-1] and x.dtype == torch.bfloat16


def torch_gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear of one bf16 row by torch's own GEMV kernel (fp32 accumulation, bf16 result).

    torch hands bf16 products to oneDNN where oneDNN is enabled; for one row, torch's own
    kernel streams the (out, in) weight at about the memory bandwidth, faster than oneDNN even
    with a packed weight (GPT-2 small's shapes: 20-27 GB/s vs 11-18, Zen 4, 2 threads). The
    switch is process-wide for the duration of the call: a bf16 product another thread runs in
    that moment takes torch's kernels too (the same result, up to summation order).
    """
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def one_row_small(x: Tensor, weights: int) -> bool:
    """One fp32 row times fewer than PACK_ONE_ROW weights: too small for a packed product (in
    bf16 the plain kernels are slower still: packed at every size)."""
    return x.numel() == x.shape[-1] and weights < PACK_ONE_ROW and x.dtype == torch.float32


def transposed_product(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight_t (in, out) + bias."""
    x2 = x.reshape(-1, weight_t.shape[0])  # (rows, in)
    y = x2 @ weight_t if bias is None else torch.addmm(bias, x2, weight_t)
    return y.view(*x.shape[:-1], -1)  # (..., out)


def decode_step(x: Tensor, weight: Tensor) -> bool:
    """True for an inference product of a few rows (a decode step of 1 to FEW_ROWS sequences)
    on the CPU, in the weight's own dtype (not under autocast), with a plain (not DTensor)
    weight. Called by every Linear: cheapest checks first."""
    return (not torch.is_grad_enabled() and x.is_cpu and x.numel() <= FEW_ROWS * x.shape[-1]
            and x.dtype == weight.dtype and type(weight) in _PLAIN
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu"))


_PLAIN = (nn.Parameter, Tensor)  # a DTensor parameter's type is DTensor


# A decode step streams every weight from memory for a few rows, and MKL's small-M GEMM reads
# our (out, in) weights slowly there. oneDNN's product with the weight reordered once into its
# own blocked layout (what torch.compile's CPU "freezing" does) reads it at about the memory
# bandwidth: GPT-2 small's weights, one row, fp32 22.7 ms vs 38.7 (F.linear), 8 rows 25.7 vs
# 61.9; bf16 ~14 vs 21 (Zen 4, 2 threads). None where torch has no oneDNN.
_ONEDNN = {"ok": torch.backends.mkldnn.is_available()}
# Below this many fp32 weights a one-row packed product's fixed cost (~20 us) outweighs its
# gain (256 x 256: 7.8 us plain vs 23 packed; 256 x 4,096: 121-149 vs 73).
PACK_ONE_ROW = 2**19


def packed_weight(owner: nn.Module, name: str, weights: tuple[Tensor, ...]) -> Tensor | None:
    """The oneDNN-packed copy of the weights stacked by rows (out, in), kept on `owner` until
    one of them changes (derived_tensor); None where oneDNN cannot pack them."""
    if not _ONEDNN["ok"]:
        return None

    def build() -> Tensor:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        # packed for 8 rows: measured as fast as a 1-row packing for one row, faster for more
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 8)

    try:
        return derived_tensor(owner, name, weights, build)
    except (RuntimeError, AttributeError):  # a torch build or dtype oneDNN does not take
        _ONEDNN["ok"] = False
        return None


def packed_product(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ the packed weight's transpose + bias: (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def fused_qkv(projections: tuple[nn.Linear, nn.Linear, nn.Linear], owner: nn.Module,
              x: Tensor) -> tuple[Tensor, ...] | None:
    """q, k, v of a decode step from one product with a copy of the three weights stacked (each
    small product pays a fixed cost): packed, or plain for torch_gemv's one bf16 row; None
    where it does not apply.

    The caller passes plain Linear projections only: a wrapped one (LoRA, a quantized layer)
    computes more than its `.weight`, so the fused copy would skip it.
    """
    weights = tuple(p.weight for p in projections)
    if not decode_step(x, weights[0]) or slow_bf16_cpu(x):
        return None
    bias = None
    if projections[0].bias is not None:
        biases = tuple(p.bias for p in projections)
        bias = derived_tensor(owner, "_qkv_bias", biases, lambda: torch.cat(biases).detach())
    if one_bf16_row(x):  # torch's GEMV on a plain (q + k + v, C) copy
        fused = derived_tensor(owner, "_qkv", weights, lambda: torch.cat(weights).detach())
        product = torch_gemv
    elif one_row_small(x, sum(w.numel() for w in weights)):
        # one row, small weights: an (in, q + k + v) copy, as Linear does (see fast_linear)
        fused = derived_tensor(owner, "_qkv_t", weights,
                               lambda: torch.cat(weights).detach().t().contiguous())
        product = transposed_product
    else:
        fused, product = packed_weight(owner, "_qkv_packed", weights), packed_product
    if fused is None:
        return None
    return product(x, fused, bias).split([p.out_features for p in projections], dim=-1)


# On a CPU with native bf16, torch's flash attention kernel is slow in bf16; two bf16 GEMMs and
# a softmax are faster for decode steps at any length (3-5x: 8 rows x 1,024 keys 2.1 vs 7.3 ms)
# and, forward + backward, up to this many keys: 2.2x (128 keys) to 1.15x (512); from 1,024 keys
# on flash wins, as it skips the masked half (Zen 4, 2 threads).
SHORT_BF16_ATTENTION = 512


def bf16_attention_by_gemms(q: Tensor, keys: int) -> bool:
    """True where bf16 attention of q (..., T, hd) over `keys` keys is faster as GEMMs than as
    torch's flash kernel on this CPU (see SHORT_BF16_ATTENTION)."""
    return (q.is_cpu and q.dtype == torch.bfloat16 and cpu_has_native_bf16()
            and (q.shape[-2] <= FEW_ROWS or keys <= SHORT_BF16_ATTENTION))


def sdpa_via_fp32(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                  dropout_p: float, gqa: bool) -> Tensor:
    """bf16 attention as fp32 SDPA on bf16-rounded values (as exact), for CPUs where torch's
    bf16 kernel is slow."""
    with torch.autocast("cpu", enabled=False):
        q, k, v = bf16_exact(q), bf16_exact(k), bf16_exact(v)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=causal, enable_gqa=gqa)
    return y.to(torch.bfloat16)
