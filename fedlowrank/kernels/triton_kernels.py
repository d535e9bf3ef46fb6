"""Triton kernels for many clients' LoRA adapters in one batch (BGMV/SGMV style, with a backward).

Two kernels cover every operation:

* ``_shrink_expand_kernel`` — per example ``n`` with client ``c = idx[n]``: ``h = x_n A_cᵀ`` (shrink, kept in
  registers) then ``y = s · h B_cᵀ`` (expand). Used for the forward and, with ``A``/``B`` passed as transposed
  views, for ``grad_x = s · (g B_c) A_c``. It can also store ``h`` (saved for the backward) and skip the expand.
* ``_segment_outer_kernel`` — ``out[j] = s · Σ_{n ∈ segment j} w_n · P_nᵀ Q_n`` summed over tokens, with
  examples grouped into segments by a permutation. Segments = clients gives the per-client ``grad_A``/``grad_B``
  (deterministic: no atomics); segments = single examples gives per-sample gradients, or, with ``NORM_ONLY``,
  their squared Frobenius norms without writing the gradients to memory (materialised tile by tile in
  registers only).

Block sizes are fixed (no ``triton.autotune``): autotune does not run under ``TRITON_INTERPRET=1``, and the GPU
path has not been tuned on hardware yet. ``TRITON_INTERPRET`` is read by ``triton.jit`` when this module is
imported, so set it before the first import of this module.

The module imports without triton installed; then ``TRITON_AVAILABLE`` is False and the launch functions raise.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: CPU-only installs use the PyTorch reference twins
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = [
    "TRITON_AVAILABLE",
    "interpret_mode",
    "lora_shrink_expand",
    "segment_outer",
    "triton_supports",
    "MAX_RANK",
]

# The rank is held in one register tile (padded to a power of two >= 16, tl.dot's minimum).
MAX_RANK = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# triton.jit picks interpreter or compiler when the kernels below are decorated, so the mode is fixed at import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpret_mode() -> bool:
    """True when this module's kernels were decorated for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _INTERPRETED


def triton_supports(*tensors: torch.Tensor, rank: int) -> bool:
    """Whether the Triton kernels can run on these tensors (device, dtype, rank), without forcing."""
    if not TRITON_AVAILABLE or rank > MAX_RANK:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if not (on_cuda or (on_cpu and interpret_mode())):
        return False
    return all(t.dtype in _DTYPES for t in tensors if t.is_floating_point())


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def _blocks() -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_FEAT, num_warps). Tiny tiles in the interpreter (it is slow); moderate ones on a GPU."""
    if interpret_mode():
        return 16, 16, 1
    return 64, 64, 4


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's matmul setting so results match the reference (tf32 only when the user allows it);
    # 16-bit operands ignore the setting on a GPU, and the interpreter computes them upcast to fp32.
    if interpret_mode():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def _dot_upcast(dtype: torch.dtype) -> bool:
    # The interpreter (triton 3.7-3.9) multiplies bf16 tiles as their raw uint16 bits in tl.dot; upcast there only.
    return interpret_mode() and dtype == torch.bfloat16


def _require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed: use the PyTorch reference (fedlowrank.kernels.reference)")


if TRITON_AVAILABLE:

    @triton.jit
    def _load_tile(ptr, rows, row_stride, row_mask, cols, col_stride, col_mask):
        """The (rows x cols) tile at ``ptr`` (strided), zeros outside the masks."""
        offsets = rows[:, None] * row_stride + cols[None, :] * col_stride
        return tl.load(ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)

    @triton.jit
    def _store_tile(ptr, rows, row_stride, row_mask, cols, col_stride, col_mask, values):
        """Write ``values`` (rows x cols, cast to ``ptr``'s type) at ``ptr`` (strided), inside the masks."""
        offsets = rows[:, None] * row_stride + cols[None, :] * col_stride
        tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton.jit
    def _block(start, BLOCK: tl.constexpr, limit):
        """Offsets start .. start + BLOCK and which of them lie below ``limit``."""
        offsets = start + tl.arange(0, BLOCK)
        return offsets, offsets < limit

    @triton.jit
    def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
        """acc + a @ b, accumulating in float32 (half-precision inputs upcast first when asked)."""
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    @triton.jit
    def _tiled_dot(acc, a_ptr, a_rows, a_row_stride, a_row_mask, a_k_stride, b_ptr, b_k_stride, b_cols, b_col_stride,
                   b_col_mask, K, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   DOT_UPCAST: tl.constexpr):  # fmt: skip
        """acc + A[rows, :K] @ B[:K, cols], the reduction over K walked in blocks of BLOCK_K."""
        for k0 in range(0, K, BLOCK_K):
            offs_k, k_mask = _block(k0, BLOCK_K, K)
            a_tile = _load_tile(a_ptr, a_rows, a_row_stride, a_row_mask, offs_k, a_k_stride, k_mask)
            b_tile = _load_tile(b_ptr, offs_k, b_k_stride, k_mask, b_cols, b_col_stride, b_col_mask)
            acc = _dot(a_tile, b_tile, acc, INPUT_PRECISION, DOT_UPCAST)
        return acc

    @triton.jit
    def _shrink_expand_kernel(x_ptr, a_ptr, b_ptr, idx_ptr, y_ptr, h_ptr, T, D_IN, R, D_OUT, sxn, sxt,
                              sxd, sak, sar, sad, sbk, sbo, sbr, syn, syt, syo, shn, sht, shr, scale,
                              STORE_H: tl.constexpr, DO_EXPAND: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, R_PAD: tl.constexpr,
                              INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):  # fmt: skip
        # One program = one example x one tile of tokens; the rank-r intermediate never leaves registers.
        n = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1)
        c = tl.load(idx_ptr + n).to(tl.int64)
        offs_t, t_mask = _block(pid_t * BLOCK_T, BLOCK_T, T)
        offs_r, r_mask = _block(0, R_PAD, R)

        # h = x_n A_cᵀ: x_n's (token, d) tiles times A_cᵀ's (d, rank) tiles
        acc = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        x_n, a_c = x_ptr + n * sxn, a_ptr + c * sak
        acc = _tiled_dot(acc, x_n, offs_t, sxt, t_mask, sxd, a_c, sad, offs_r, sar, r_mask, D_IN, BLOCK_D,
                         INPUT_PRECISION, DOT_UPCAST)  # fmt: skip

        if STORE_H:
            _store_tile(h_ptr + n * shn, offs_t, sht, t_mask, offs_r, shr, r_mask, acc)

        if DO_EXPAND:
            # Round h to the adapter dtype like the reference's two-matmul chain does.
            h = acc.to(b_ptr.dtype.element_ty)
            if DOT_UPCAST:
                h = h.to(tl.float32)
            for o0 in range(0, D_OUT, BLOCK_O):
                offs_o, o_mask = _block(o0, BLOCK_O, D_OUT)
                # (R_PAD, BLOCK_O) of B_cᵀ
                b_tile = _load_tile(b_ptr + c * sbk, offs_r, sbr, r_mask, offs_o, sbo, o_mask)
                if DOT_UPCAST:
                    b_tile = b_tile.to(tl.float32)
                y = tl.dot(h, b_tile, input_precision=INPUT_PRECISION) * scale
                _store_tile(y_ptr + n * syn, offs_t, syt, t_mask, offs_o, syo, o_mask, y)

    @triton.jit
    def _segment_outer_kernel(p_ptr, q_ptr, perm_ptr, seg_ptr, w_ptr, out_ptr, T, P, Q, spn, spt, spp,
                              sqn, sqt, sqq, so0, so1, so2, scale, HAS_W: tl.constexpr,
                              NORM_ONLY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_Q: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                              DOT_UPCAST: tl.constexpr):  # fmt: skip
        # One program = one segment x one (P, Q) output tile; it walks the segment's examples serially, so the
        # sum is deterministic and an empty segment writes zeros.
        j = tl.program_id(0).to(tl.int64)
        pid_p = tl.program_id(1)
        pid_q = tl.program_id(2)
        offs_p, p_mask = _block(pid_p * BLOCK_P, BLOCK_P, P)
        offs_q, q_mask = _block(pid_q * BLOCK_Q, BLOCK_Q, Q)
        start = tl.load(seg_ptr + j)
        end = tl.load(seg_ptr + j + 1)

        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for e in range(start, end):
            n = tl.load(perm_ptr + e).to(tl.int64)
            # P_nᵀ Q_n: P_nᵀ's (p, token) tiles times Q_n's (token, q) tiles
            part = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
            p_n, q_n = p_ptr + n * spn, q_ptr + n * sqn
            part = _tiled_dot(part, p_n, offs_p, spp, p_mask, spt, q_n, sqt, offs_q, sqq, q_mask, T, BLOCK_T,
                              INPUT_PRECISION, DOT_UPCAST)  # fmt: skip
            if HAS_W:
                part = part * tl.load(w_ptr + n).to(tl.float32)
            acc += part

        acc = acc * scale
        if NORM_ONLY:
            # Partial squared norm of this tile; masked rows/columns are exact zeros.
            tl.store(out_ptr + j * so0 + pid_p * so1 + pid_q * so2, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
        else:
            _store_tile(out_ptr + j * so0, offs_p, so1, p_mask, offs_q, so2, q_mask, acc)


def lora_shrink_expand(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    client_index: torch.Tensor,
    scale: float,
    *,
    store_h: bool = False,
    expand: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``y[n] = scale · (x[n] a[c]ᵀ) b[c]ᵀ`` with ``c = client_index[n]``; returns ``(y, h)``.

    x (N, T, d_in); a (K, r, d_in); b (K, d_out, r) — any strides, so transposed views work (the backward
    passes ``b=Aᵀ``, ``a=Bᵀ``). ``h = x[n] a[c]ᵀ`` (N, T, r) is returned when ``store_h``; y is None when not
    ``expand``.
    """
    _require_triton()
    n_ex, t_len, d_in = x.shape
    _, r, _ = a.shape
    d_out = b.shape[1]
    y = x.new_empty((n_ex, t_len, d_out)) if expand else None
    h = x.new_empty((n_ex, t_len, r)) if store_h else None
    if n_ex == 0 or t_len == 0:
        if y is not None:
            y.zero_()
        return y, h
    block_t, block_f, num_warps = _blocks()
    y_arg = y if y is not None else x  # unused pointer when not expanding
    h_arg = h if h is not None else x
    ys = y.stride() if y is not None else (0, 0, 0)
    hs = h.stride() if h is not None else (0, 0, 0)
    grid = (n_ex, triton.cdiv(t_len, block_t))
    _shrink_expand_kernel[grid](
        x,
        a,
        b,
        client_index,
        y_arg,
        h_arg,
        t_len,
        d_in,
        r,
        d_out,
        *x.stride(),
        *a.stride(),
        *b.stride(),
        *ys,
        *hs,
        float(scale),
        STORE_H=store_h,
        DO_EXPAND=expand,
        BLOCK_T=block_t,
        BLOCK_D=block_f,
        BLOCK_O=block_f,
        R_PAD=_pow2_at_least_16(r),
        INPUT_PRECISION=_input_precision(x.dtype),
        DOT_UPCAST=_dot_upcast(x.dtype),
        num_warps=num_warps,
    )
    return y, h


def segment_outer(
    p: torch.Tensor,
    q: torch.Tensor,
    perm: torch.Tensor,
    segment_offsets: torch.Tensor,
    scale: float,
    *,
    weights: torch.Tensor | None = None,
    norm_only: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``out[j] = scale · Σ_{e in [off[j], off[j+1])} w[perm[e]] · p[perm[e]]ᵀ q[perm[e]]`` (sum over tokens).

    p (N, T, P), q (N, T, Q), perm (N',) example ids grouped by segment, segment_offsets (S+1,). Returns
    (S, P, Q), or with ``norm_only`` the (S,) float32 squared Frobenius norms of those matrices.
    """
    _require_triton()
    n_ex, t_len, p_dim = p.shape
    q_dim = q.shape[2]
    n_seg = segment_offsets.numel() - 1
    block_t, block_f, num_warps = _blocks()
    # The rank side gets one padded tile; the wide side is tiled.
    block_p = _pow2_at_least_16(p_dim) if p_dim <= MAX_RANK and p_dim <= q_dim else block_f
    block_q = _pow2_at_least_16(q_dim) if q_dim <= MAX_RANK and q_dim < p_dim else block_f
    grid = (n_seg, triton.cdiv(p_dim, block_p), triton.cdiv(q_dim, block_q))
    if norm_only:
        out = torch.empty(grid, device=p.device, dtype=torch.float32)
    else:
        out = torch.empty((n_seg, p_dim, q_dim), device=p.device, dtype=out_dtype or p.dtype)
    if n_seg == 0:
        return out.sum(dim=(1, 2)) if norm_only else out
    if t_len == 0 or n_ex == 0:
        out.zero_()
        return out.sum(dim=(1, 2)) if norm_only else out
    _segment_outer_kernel[grid](
        p,
        q,
        perm,
        segment_offsets,
        weights if weights is not None else p,
        out,
        t_len,
        p_dim,
        q_dim,
        *p.stride(),
        *q.stride(),
        *out.stride(),
        float(scale),
        HAS_W=weights is not None,
        NORM_ONLY=norm_only,
        BLOCK_T=block_t,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        INPUT_PRECISION=_input_precision(p.dtype),
        DOT_UPCAST=_dot_upcast(p.dtype),
        num_warps=num_warps,
    )
    return out.sum(dim=(1, 2)) if norm_only else out
