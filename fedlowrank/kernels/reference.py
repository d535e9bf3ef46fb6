"""Plain-PyTorch twins of the multi-client LoRA kernels: the CPU fallback and the test oracle.

Notation (peft): a LoRA layer is ``y = W0 x + s · B (A x)`` with ``A ∈ R^{r×d}``, ``B ∈ R^{k×r}``. Here K clients'
adapters are stacked, ``A (K, r, d)`` and ``B (K, k, r)``, and each of the N examples ``x[n] (T, d)`` belongs to
client ``client_index[n]``. Functions return only the LoRA branch ``s · B_c (A_c x)`` and its gradients; the
frozen base ``W0 x`` is one ordinary GEMM over all tokens and stays with the caller.

For example ``n`` of client ``c`` with upstream gradient ``g_n = ∂L/∂y_n (T, k)``:
``H_n = x_n A_cᵀ``, ``V_n = s · g_n B_c``; then ``∇_{x_n} = V_n A_c``, per-sample ``∇_A = V_nᵀ x_n`` (r, d) and
``∇_B = s · g_nᵀ H_n`` (k, r); a client's gradient is the sum over its examples only.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "multi_lora_forward",
    "multi_lora_forward_segmented",
    "multi_lora_backward",
    "per_sample_lora_grads",
    "per_sample_grad_norms_sq",
    "sort_by_client",
    "grouped_mm_supported",
]


def _gather(A: torch.Tensor, B: torch.Tensor, client_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # BGMV in PyTorch: one copy of the adapter per example (N·r·(d+k) floats), then batched GEMMs.
    return A.index_select(0, client_index), B.index_select(0, client_index)


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, client_index: torch.Tensor) -> None:
    if x.dim() != 3 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"expected x (N,T,d), A (K,r,d), B (K,k,r); got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(B.shape)}"
        )
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2] or A.shape[2] != x.shape[2]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if client_index.shape != (x.shape[0],) or client_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"client_index must be an integer tensor of shape ({x.shape[0]},)")


def multi_lora_forward(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, client_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """LoRA branch ``s · B_c (A_c x_n)`` per example: x (N, T, d) → (N, T, k). Differentiable by autograd."""
    _check(x, A, B, client_index)
    Ag, Bg = _gather(A, B, client_index.long())
    h = torch.bmm(x, Ag.transpose(1, 2))  # shrink: (N, T, r)
    return torch.bmm(h, Bg.transpose(1, 2)) * scale  # expand: (N, T, k)


def sort_by_client(client_index: torch.Tensor, num_clients: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, segment_offsets)``: ``x[perm]`` is grouped by client, client c owning rows
    ``segment_offsets[c]:segment_offsets[c+1]`` (K+1 offsets, int64; empty clients have equal offsets).

    Stable, so examples keep their order within a client; no host synchronisation.
    """
    idx = client_index.long()
    perm = torch.argsort(idx, stable=True)
    bounds = torch.arange(num_clients + 1, device=idx.device, dtype=idx.dtype)
    return perm, torch.searchsorted(idx[perm], bounds)


def grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` accepts these operands.

    Measured with torch 2.13 on CPU: fp32/bf16/fp16 work (fp64 does not), strides and data pointers must be
    multiples of 16 bytes, empty groups are fine. On CUDA it is documented for bf16 on SM >= 80 only.
    """
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.is_cuda:
            if t.dtype != torch.bfloat16 or torch.cuda.get_device_capability(t.device) < (8, 0):
                return False
        elif t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        size = t.element_size()
        if t.data_ptr() % 16 or any(
            (st * size) % 16 for st, n in zip(t.stride(), t.shape, strict=True) if st != 1 and n > 1
        ):
            return False
    return True


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects expanded (stride-0) gradients such as the one from ``y.sum()``.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def multi_lora_forward_segmented(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    segment_offsets: torch.Tensor,
    scale: float,
    impl: Literal["auto", "grouped_mm", "bmm", "loop"] = "auto",
) -> torch.Tensor:
    """SGMV: like :func:`multi_lora_forward` with examples already sorted by client (see :func:`sort_by_client`).

    x (N, T, d), ``segment_offsets`` (K+1,) with client c owning examples ``[off[c], off[c+1])`` (uneven and
    empty segments allowed). Returns (N, T, k); differentiable by autograd in every ``impl``.

    ``impl``: ``grouped_mm`` (one ragged GEMM per factor over all tokens, no per-example adapter copies),
    ``bmm`` (equal segment sizes only), ``loop`` (one pair of GEMMs per client). ``auto`` picks ``grouped_mm``
    when :func:`grouped_mm_supported`, else ``bmm`` when the segments are equal, else ``loop``.
    """
    n_ex, t_len, d = x.shape
    n_cl, r, _ = A.shape
    if segment_offsets.shape != (n_cl + 1,):
        raise ValueError(f"segment_offsets must have shape ({n_cl + 1},), got {tuple(segment_offsets.shape)}")
    if impl == "auto":
        # h (N·T, r) and y (N·T, k) are grouped_mm operands/outputs too, so r and k rows must align as well.
        row_ok = all((n * x.element_size()) % 16 == 0 for n in (r, B.shape[1]))
        if row_ok and grouped_mm_supported(x, A, B):
            impl = "grouped_mm"
        else:
            sizes = torch.diff(segment_offsets)
            impl = "bmm" if bool((sizes == sizes[0]).all()) else "loop"

    if impl == "grouped_mm":
        offs = (segment_offsets[1:] * t_len).to(torch.int32)
        h = _contiguous_grad(F.grouped_mm(x.reshape(n_ex * t_len, d), A.transpose(1, 2), offs=offs))
        y = _contiguous_grad(F.grouped_mm(h, B.transpose(1, 2), offs=offs))
        return (y * scale).reshape(n_ex, t_len, -1)
    if impl == "bmm":
        per = n_ex // n_cl
        if per * n_cl != n_ex or not bool((torch.diff(segment_offsets) == per).all()):
            raise ValueError("impl='bmm' needs equal segment sizes")
        xs = x.reshape(n_cl, per * t_len, d)
        y = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * scale
        return y.reshape(n_ex, t_len, -1)
    if impl == "loop":
        bounds = segment_offsets.tolist()
        parts = [
            (x[s:e] @ A[c].T) @ B[c].T * scale for c, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        ]
        return torch.cat(parts, dim=0) if parts else x.new_zeros((0, t_len, B.shape[1]))
    raise ValueError(f"unknown impl {impl!r}")


def multi_lora_backward(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                        example_weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of ``<grad_out, multi_lora_forward(...)>``: ``(grad_x (N,T,d), grad_A (K,r,d), grad_B (K,k,r))``.

    Client c's ``grad_A``/``grad_B`` sum over its examples only; clients without examples get zeros.
    ``example_weights`` (N,) scales each example's parameter-gradient contribution (e.g. DP clip factors) and
    leaves ``grad_x`` alone. Memory: materialises the per-sample gradients (N·r·(d+k)) before reducing.
    """
    grad_A_i, grad_B_i, grad_x = _per_sample(x, A, B, client_index, scale, grad_out, need_grad_x=True)
    if example_weights is not None:
        w = example_weights.to(grad_A_i.dtype).view(-1, 1, 1)
        grad_A_i, grad_B_i = grad_A_i * w, grad_B_i * w
    idx = client_index.long()
    grad_A = torch.zeros_like(A).index_add_(0, idx, grad_A_i)
    grad_B = torch.zeros_like(B).index_add_(0, idx, grad_B_i)
    return grad_x, grad_A, grad_B


def _per_sample(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                need_grad_x: bool) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    _check(x, A, B, client_index)
    Ag, Bg = _gather(A, B, client_index.long())
    h = torch.bmm(x, Ag.transpose(1, 2))  # H_n (N, T, r)
    v = torch.bmm(grad_out, Bg) * scale  # V_n (N, T, r)
    grad_A_i = torch.bmm(v.transpose(1, 2), x)  # (N, r, d)
    grad_B_i = torch.bmm(grad_out.transpose(1, 2), h) * scale  # (N, k, r)
    grad_x = torch.bmm(v, Ag) if need_grad_x else None
    return grad_A_i, grad_B_i, grad_x


def per_sample_lora_grads(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float,
                          grad_out: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per-example gradients ``(∇A_n (N, r, d), ∇B_n (N, k, r))`` of the example's own adapter."""
    grad_A_i, grad_B_i, _ = _per_sample(x, A, B, client_index, scale, grad_out, need_grad_x=False)
    return grad_A_i, grad_B_i


def _gram_norm_sq(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # ‖P_nᵀ Q_n‖²_F = <P_n P_nᵀ, Q_n Q_nᵀ> (T×T Gram matrices, never the d-sized gradient).
    return (torch.bmm(p, p.transpose(1, 2)) * torch.bmm(q, q.transpose(1, 2))).sum(dim=(1, 2))


def per_sample_grad_norms_sq(x: Tensor, A: Tensor, B: Tensor, client_index: Tensor, scale: float, grad_out: Tensor,
                             method: Literal["auto", "materialize", "gram"] = "auto") -> Tensor:  # fmt: skip
    """``‖∇A_n‖² + ‖∇B_n‖²`` per example, shape (N,), for DP clipping.

    ``materialize`` forms ∇A_n, ∇B_n (T·r·(d+k) MACs and r·(d+k) floats per example); ``gram`` uses the ghost-norm
    identity ``‖PᵀQ‖² = <PPᵀ, QQᵀ>`` (T²·(r+d) and T²·(k+r) MACs, T² floats). ``auto`` picks, per factor, the
    cheaper: Gram only when ``T·(p+q) < p·q``, i.e. roughly when T < r.
    """
    if method not in ("auto", "materialize", "gram"):
        raise ValueError(f"unknown method {method!r}")
    _check(x, A, B, client_index)
    Ag, Bg = _gather(A, B, client_index.long())
    t_len = x.shape[1]
    h = torch.bmm(x, Ag.transpose(1, 2))
    v = torch.bmm(grad_out, Bg) * scale
    u = grad_out * scale

    def factor(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        p_dim, q_dim = p.shape[2], q.shape[2]
        if method == "gram" or (method == "auto" and t_len * (p_dim + q_dim) < p_dim * q_dim):
            return _gram_norm_sq(p, q)
        return torch.bmm(p.transpose(1, 2), q).pow(2).sum(dim=(1, 2))

    return factor(v, x) + factor(u, h)
