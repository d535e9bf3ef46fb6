"""Dispatching entry points: Triton kernels on CUDA (or in the Triton interpreter), PyTorch reference otherwise.

``backend``: ``"auto"`` uses Triton when it is installed, the tensors are on CUDA (or on CPU with
``TRITON_INTERPRET=1``), share one dtype among fp32/fp16/bf16 and the rank is at most
:data:`~fedlowrank.kernels.triton_kernels.MAX_RANK`; ``"triton"`` insists (and raises when it cannot);
``"reference"`` always uses :mod:`fedlowrank.kernels.reference`.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from . import reference as ref

Tensor = torch.Tensor
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]
Backend = Literal["auto", "triton", "reference"]

__all__ = [
    "Backend",
    "MultiLoRAFunction",
    "multi_lora",
    "multi_lora_backward",
    "per_sample_lora_grads",
    "per_sample_grad_norms_sq",
    "triton_available",
    "uses_triton",
]


def _tk():
    # Imported lazily: importing triton is slow, and triton.jit reads TRITON_INTERPRET at import time.
    from . import triton_kernels

    return triton_kernels


def triton_available() -> bool:
    """Whether triton imports (says nothing about a GPU)."""
    return _tk().TRITON_AVAILABLE


def uses_triton(backend: Backend, *tensors: torch.Tensor, rank: int) -> bool:
    """Resolve ``backend`` for these operands; see the module docstring."""
    if backend == "reference":
        return False
    if backend not in ("auto", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    floats = [t for t in tensors if t.is_floating_point()]
    same_dtype = len({t.dtype for t in floats}) <= 1
    if backend == "auto":
        if not any(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            return False  # CPU without the interpreter: never import triton
        return same_dtype and _tk().triton_supports(*tensors, rank=rank)
    tk = _tk()
    if not tk.TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' but triton is not installed")
    if not (same_dtype and tk.triton_supports(*tensors, rank=rank)):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import) of one "
            f"dtype among fp32/fp16/bf16 and rank <= {tk.MAX_RANK}; got devices "
            f"{sorted({str(t.device) for t in tensors})}, dtypes {sorted({str(t.dtype) for t in floats})}, rank {rank}"
        )
    return True


def _check_index(client_index: torch.Tensor, num_clients: int) -> None:
    # Triton reads adapters at whatever index it is given; check where it costs no device sync.
    if client_index.device.type == "cpu" and client_index.numel():
        lo, hi = int(client_index.min()), int(client_index.max())
        if lo < 0 or hi >= num_clients:
            raise IndexError(f"client_index values must lie in [0, {num_clients}), got [{lo}, {hi}]")


def _triton_grads(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                  h: Tensor | None, needs: tuple[bool, bool, bool],
                  example_weights: Tensor | None = None) -> Grads:  # fmt: skip
    tk = _tk()
    need_x, need_A, need_B = needs
    grad_x = grad_A = grad_B = None
    v = None
    if need_x or need_A:
        # grad_x = s·(g B_c) A_c is the forward kernel with the factors' transposes; it also yields g B_c.
        grad_x, v = tk.lora_shrink_expand(
            grad_out, B.transpose(1, 2), A.transpose(1, 2), client_index, scale, store_h=need_A, expand=need_x
        )
    if need_A or need_B:
        perm, offsets = ref.sort_by_client(client_index, A.shape[0])
        if need_A:
            grad_A = tk.segment_outer(v, x, perm, offsets, scale, weights=example_weights, out_dtype=A.dtype)
        if need_B:
            if h is None:
                _, h = tk.lora_shrink_expand(x, A, B, client_index, 1.0, store_h=True, expand=False)
            grad_B = tk.segment_outer(grad_out, h, perm, offsets, scale, weights=example_weights, out_dtype=B.dtype)
    return grad_x, grad_A, grad_B


def _reference_grads(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                     h: Tensor, needs: tuple[bool, bool, bool],
                     into: tuple[Tensor | None, Tensor | None] = (None, None)) -> Grads:  # fmt: skip
    # Same math as reference.multi_lora_backward, reusing the forward's H and skipping unneeded outputs.
    # ``into``: buffers the per-example gradients are added into (and returned) instead of fresh zeros.
    need_x, need_A, need_B = needs
    idx = client_index.long()
    grad_x = grad_A = grad_B = None
    if need_x or need_A:
        Ag = A.index_select(0, idx)
        v = torch.bmm(grad_out, B.index_select(0, idx)) * scale
        if need_x:
            grad_x = torch.bmm(v, Ag)
        if need_A:
            buffer = torch.zeros_like(A) if into[0] is None else into[0]
            grad_A = buffer.index_add_(0, idx, torch.bmm(v.transpose(1, 2), x))
    if need_B:
        buffer = torch.zeros_like(B) if into[1] is None else into[1]
        grad_B = buffer.index_add_(0, idx, torch.bmm(grad_out.transpose(1, 2), h) * scale)
    return grad_x, grad_A, grad_B


def _grad_buffer(param: Tensor) -> Tensor:
    """``param.grad``, made (zeros) where there is none yet."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class MultiLoRAFunction(torch.autograd.Function):
    """``y = s · B_c (A_c x_n)`` for stacked client adapters, with a hand-written backward.

    ``apply(x (N,T,d), A (K,r,d), B (K,k,r), client_index (N,), scale, backend, accumulate)`` → (N, T, k). Saves
    H = x A_cᵀ (N·T·r) for the backward instead of recomputing it. Not twice differentiable. ``accumulate``
    (A and B leaf tensors): the backward adds ∇A and ∇B into ``A.grad`` and ``B.grad`` itself and returns none
    for them. Why: autograd adds a returned (K, r, d) gradient to ``.grad``, and the reference path first
    fills one with zeros, two passes over all K clients' rows for every forward chunk although a chunk holds a
    few of them (the batched engine: 2.6 % of a 512-client round on a CPU).
    """

    @staticmethod
    def forward(ctx, x, A, B, client_index, scale, backend="auto", accumulate=False):
        on_triton = uses_triton(backend, x, A, B, rank=A.shape[1])
        if on_triton:
            _check_index(client_index, A.shape[0])
            y, h = _tk().lora_shrink_expand(x, A, B, client_index, scale, store_h=True)
        else:
            ref._check(x, A, B, client_index)
            idx = client_index.long()
            h = torch.bmm(x, A.index_select(0, idx).transpose(1, 2))
            y = torch.bmm(h, B.index_select(0, idx).transpose(1, 2)) * scale
        ctx.save_for_backward(x, A, B, client_index, h)
        ctx.scale = float(scale)
        ctx.on_triton = on_triton
        ctx.leaves = (A, B) if accumulate else None  # the tensors whose .grad the backward adds to
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, A, B, client_index, h = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.leaves is not None and not ctx.on_triton:
            into = tuple(_grad_buffer(leaf) if need else None for leaf, need in zip(ctx.leaves, needs[1:], strict=True))
            grad_x, _, _ = _reference_grads(x, A, B, client_index, ctx.scale, grad_out, h, needs, into)
            return grad_x, None, None, None, None, None, None
        if ctx.on_triton:
            grads = _triton_grads(x, A, B, client_index, ctx.scale, grad_out, h, needs)
        else:
            grads = _reference_grads(x, A, B, client_index, ctx.scale, grad_out, h, needs)
        if ctx.leaves is not None:  # Triton made whole gradients: added here, as autograd would
            for leaf, grad in zip(ctx.leaves, grads[1:], strict=True):
                if grad is not None:
                    _grad_buffer(leaf).add_(grad)
            grads = (grads[0], None, None)
        return (*grads, None, None, None, None)


def multi_lora(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    client_index: Tensor,
    scale: float,
    backend: Backend = "auto",
    accumulate: bool = False,
) -> Tensor:
    """LoRA branch of K clients' adapters in one call: ``s · B_c (A_c x_n)`` with ``c = client_index[n]``.

    x (N, T, d) or (N, d); A (K, r, d); B (K, k, r); client_index (N,) int in [0, K). Returns (N, T, k) (or
    (N, k)). Differentiable w.r.t. x, A and B; add the frozen base ``x W0ᵀ`` yourself. ``accumulate``: A's and
    B's gradients go straight into ``A.grad`` and ``B.grad`` (leaf tensors; see ``MultiLoRAFunction``), not
    through autograd (``torch.autograd.grad`` does not see them).
    """
    if x.dim() == 2:
        return MultiLoRAFunction.apply(x.unsqueeze(1), A, B, client_index, scale, backend, accumulate).squeeze(1)
    return MultiLoRAFunction.apply(x, A, B, client_index, scale, backend, accumulate)


def multi_lora_backward(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                        example_weights: Tensor | None = None,
                        backend: Backend = "auto") -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(grad_x (N,T,d), grad_A (K,r,d), grad_B (K,k,r))``; see :func:`reference.multi_lora_backward`."""
    if uses_triton(backend, x, A, B, grad_out, rank=A.shape[1]):
        _check_index(client_index, A.shape[0])
        grads = _triton_grads(x, A, B, client_index, scale, grad_out, None, (True, True, True), example_weights)
        return grads  # type: ignore[return-value]
    return ref.multi_lora_backward(x, A, B, client_index, scale, grad_out, example_weights)


def per_sample_lora_grads(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                          backend: Backend = "auto") -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-example ``(∇A_n (N, r, d), ∇B_n (N, k, r))``."""
    if not uses_triton(backend, x, A, B, grad_out, rank=A.shape[1]):
        return ref.per_sample_lora_grads(x, A, B, client_index, scale, grad_out)
    _check_index(client_index, A.shape[0])
    tk = _tk()
    p_v, h = _shrink_pair(x, A, B, client_index, grad_out)
    each, offsets = _each_example(x)
    grad_A = tk.segment_outer(p_v, x, each, offsets, scale, out_dtype=A.dtype)
    grad_B = tk.segment_outer(grad_out, h, each, offsets, scale, out_dtype=B.dtype)
    return grad_A, grad_B


def per_sample_grad_norms_sq(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                             method: Literal["auto", "materialize", "gram"] = "auto",
                             backend: Backend = "auto") -> Tensor:  # fmt: skip
    """``‖∇A_n‖² + ‖∇B_n‖²`` (N,) float32 on Triton (input dtype on the reference).

    The Triton kernel materialises each per-sample gradient tile in registers only and writes one partial sum
    per tile (``method`` is ignored there); the reference honours ``method``.
    """
    if not uses_triton(backend, x, A, B, grad_out, rank=A.shape[1]):
        return ref.per_sample_grad_norms_sq(x, A, B, client_index, scale, grad_out, method)
    _check_index(client_index, A.shape[0])
    tk = _tk()
    p_v, h = _shrink_pair(x, A, B, client_index, grad_out)
    each, offsets = _each_example(x)
    norm_a = tk.segment_outer(p_v, x, each, offsets, scale, norm_only=True)
    norm_b = tk.segment_outer(grad_out, h, each, offsets, scale, norm_only=True)
    return norm_a + norm_b


def _shrink_pair(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, client_index: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # g_n B_c (N,T,r) and H_n = x_n A_cᵀ (N,T,r), the rank-r sides of the two per-sample outer products.
    tk = _tk()
    _, v = tk.lora_shrink_expand(
        grad_out, B.transpose(1, 2), A.transpose(1, 2), client_index, 1.0, store_h=True, expand=False
    )
    _, h = tk.lora_shrink_expand(x, A, B, client_index, 1.0, store_h=True, expand=False)
    return v, h


def _each_example(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # One segment per example turns the per-client reduction kernel into a per-sample one.
    n_ex = x.shape[0]
    each = torch.arange(n_ex, device=x.device)
    return each, torch.arange(n_ex + 1, device=x.device)
