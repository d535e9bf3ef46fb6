"""Multi-client LoRA kernels: reference twins vs brute force, the autograd Function, and the Triton kernels.

The Triton kernels run in Triton's CPU interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when the kernel
module is imported, and the variable must not leak into the rest of the suite, so
``test_triton_kernels_in_interpreter`` re-runs this file's ``TestTritonInterpreted`` class in a subprocess with
``TRITON_INTERPRET=1``; in the main process that class skips itself.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlowrank.kernels import (
    MultiLoRAFunction,
    multi_lora,
    multi_lora_backward,
    multi_lora_forward_segmented,
    per_sample_grad_norms_sq,
    per_sample_lora_grads,
    reference,
    sort_by_client,
    uses_triton,
)

REPO = Path(__file__).resolve().parent.parent
_SUBPROCESS_FLAG = "FEDLOWRANK_TRITON_INTERPRETER_TESTS"
IN_INTERPRETER_RUN = os.environ.get(_SUBPROCESS_FLAG) == "1" and os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

# (client sizes, T, d, r, k): uneven sizes, empty clients, K = 1, r not a power of two.
CASES = [
    ([2, 0, 3, 1], 3, 6, 2, 5),
    ([4], 2, 5, 3, 4),
    ([0, 1, 0], 1, 4, 2, 3),
    ([1, 5, 2], 4, 7, 4, 6),
]


def _make(sizes, t_len, d, r, k, dtype=torch.float64, seed=0):
    """Random x, A, B, grad_out, and a shuffled client_index with the given per-client sizes."""
    gen = torch.Generator().manual_seed(seed)
    n_cl, n_ex = len(sizes), sum(sizes)
    idx = torch.repeat_interleave(torch.arange(n_cl), torch.tensor(sizes))
    idx = idx[torch.randperm(n_ex, generator=gen)]
    x = torch.randn(n_ex, t_len, d, generator=gen, dtype=dtype)
    A = torch.randn(n_cl, r, d, generator=gen, dtype=dtype) / d**0.5
    B = torch.randn(n_cl, k, r, generator=gen, dtype=dtype) / r**0.5
    g = torch.randn(n_ex, t_len, k, generator=gen, dtype=dtype)
    return x, A, B, idx, g


def _brute_force(x, A, B, idx, scale, g):
    """One peft-style LoRA layer per example, differentiated by torch.autograd one example at a time."""
    out, gx, gA_i, gB_i = [], [], [], []
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    for n, c in enumerate(idx.tolist()):
        xn = x[n].clone().requires_grad_(True)
        a = A[c].clone().requires_grad_(True)  # lora_A.weight (r, d)
        b = B[c].clone().requires_grad_(True)  # lora_B.weight (k, r)
        yn = torch.nn.functional.linear(torch.nn.functional.linear(xn, a), b) * scale
        dx, da, db = torch.autograd.grad((yn * g[n]).sum(), (xn, a, b))
        out.append(yn.detach())
        gx.append(dx)
        gA_i.append(da)
        gB_i.append(db)
        gA[c] += da
        gB[c] += db
    stack = torch.stack
    return stack(out), stack(gx), gA, gB, stack(gA_i), stack(gB_i)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case):
    x, A, B, idx, g = _make(*case)
    s = 0.75
    y, gx, gA, gB, gA_i, gB_i = _brute_force(x, A, B, idx, s, g)
    torch.testing.assert_close(reference.multi_lora_forward(x, A, B, idx, s), y)
    rx, rA, rB = reference.multi_lora_backward(x, A, B, idx, s, g)
    torch.testing.assert_close(rx, gx)
    torch.testing.assert_close(rA, gA)
    torch.testing.assert_close(rB, gB)
    pA, pB = reference.per_sample_lora_grads(x, A, B, idx, s, g)
    torch.testing.assert_close(pA, gA_i)
    torch.testing.assert_close(pB, gB_i)
    want = gA_i.pow(2).sum((1, 2)) + gB_i.pow(2).sum((1, 2))
    for method in ("materialize", "gram", "auto"):
        torch.testing.assert_close(reference.per_sample_grad_norms_sq(x, A, B, idx, s, g, method=method), want)
    # Weighted (clipped) per-client sums: Σ_n w_n ∇_n, grad_x untouched.
    w = torch.linspace(0.1, 1.0, x.shape[0], dtype=x.dtype)
    wx, wA, wB = reference.multi_lora_backward(x, A, B, idx, s, g, example_weights=w)
    torch.testing.assert_close(wx, gx)
    torch.testing.assert_close(wA, torch.zeros_like(A).index_add_(0, idx, gA_i * w[:, None, None]))
    torch.testing.assert_close(wB, torch.zeros_like(B).index_add_(0, idx, gB_i * w[:, None, None]))


def test_empty_clients_get_zero_grads():
    x, A, B, idx, g = _make([3, 0, 2, 0], 2, 4, 2, 3)
    _, gA, gB = reference.multi_lora_backward(x, A, B, idx, 1.0, g)
    assert gA[1].abs().max() == 0 and gA[3].abs().max() == 0
    assert gB[1].abs().max() == 0 and gB[3].abs().max() == 0
    assert gA[0].abs().max() > 0 and gB[2].abs().max() > 0


def test_sort_by_client():
    idx = torch.tensor([2, 0, 2, 3, 0, 0])
    perm, offsets = sort_by_client(idx, 5)
    assert offsets.tolist() == [0, 3, 3, 5, 6, 6]
    assert perm.tolist() == [1, 4, 5, 0, 2, 3]  # stable within a client


@pytest.mark.parametrize("impl", ["auto", "grouped_mm", "loop"])
@pytest.mark.parametrize("sizes", [[2, 0, 3, 1], [0, 4], [3, 0], [5]])
def test_segmented_forward_and_grads(impl, sizes):
    # fp32, 16-byte-aligned rows so grouped_mm runs on CPU; 'auto' may pick any implementation.
    x, A, B, idx, g = _make(sizes, 3, 8, 4, 8, dtype=torch.float32, seed=1)
    perm, offsets = sort_by_client(idx, len(sizes))
    xs, gs, idx_s = x[perm], g[perm], idx[perm]
    leaves = [t.clone().requires_grad_(True) for t in (xs, A, B)]
    y = multi_lora_forward_segmented(*leaves, offsets, 0.5, impl=impl)
    torch.testing.assert_close(y, reference.multi_lora_forward(xs, A, B, idx_s, 0.5))
    (y * gs).sum().backward()
    want = reference.multi_lora_backward(xs, A, B, idx_s, 0.5, gs)
    for leaf, w in zip(leaves, want, strict=True):
        torch.testing.assert_close(leaf.grad, w)


def test_segmented_bmm_and_expanded_grad():
    x, A, B, idx, _ = _make([2, 2, 2], 2, 8, 4, 4, dtype=torch.float32, seed=2)
    perm, offsets = sort_by_client(idx, 3)
    want = reference.multi_lora_forward(x[perm], A, B, idx[perm], 2.0)
    for impl in ("bmm", "grouped_mm"):
        A_leaf = A.clone().requires_grad_(True)
        y = multi_lora_forward_segmented(x[perm], A_leaf, B, offsets, 2.0, impl=impl)
        torch.testing.assert_close(y, want)
        y.sum().backward()  # a stride-0 upstream gradient, which grouped_mm's own backward rejects
        assert A_leaf.grad is not None and torch.isfinite(A_leaf.grad).all()
    with pytest.raises(ValueError, match="equal segment sizes"):
        multi_lora_forward_segmented(x[:5], A, B, torch.tensor([0, 2, 4, 5]), 1.0, impl="bmm")


def test_function_gradcheck_float64():
    x, A, B, idx, _ = _make([2, 0, 1], 2, 3, 2, 3)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    assert torch.autograd.gradcheck(lambda a, b, c: multi_lora(a, b, c, idx, 0.7), leaves)


@pytest.mark.parametrize("case", CASES)
def test_function_matches_autograd_of_reference(case):
    x, A, B, idx, g = _make(*case, dtype=torch.float32, seed=3)
    mine = [t.clone().requires_grad_(True) for t in (x, A, B)]
    theirs = [t.clone().requires_grad_(True) for t in (x, A, B)]
    y = multi_lora(*mine, idx, 1.5)
    y_ref = reference.multi_lora_forward(*theirs, idx, 1.5)
    torch.testing.assert_close(y, y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_function_frozen_inputs_and_2d_x():
    x, A, B, idx, g = _make([2, 1], 1, 4, 2, 3)
    b_leaf = B.clone().requires_grad_(True)  # FFA-LoRA: A frozen, x a constant input
    (multi_lora(x[:, 0], A, b_leaf, idx, 1.0) * g[:, 0]).sum().backward()
    torch.testing.assert_close(b_leaf.grad, reference.multi_lora_backward(x, A, B, idx, 1.0, g)[2])


def _accumulated_over_two_chunks(x, A, B, idx, g, on_triton: bool, tolerance: float):
    """Two chunks' backwards with ``accumulate=True`` add ∇A and ∇B into ``.grad`` themselves: the gradients
    autograd accumulates through the reference forward over the same chunks, ∂x unchanged; with A frozen, A gets
    no gradient. Returns that frozen A and its trained B (their ``.grad`` set)."""
    halves = (slice(0, 2), slice(2, 4))
    mine = [t.clone().requires_grad_(True) for t in (x, A, B)]
    theirs = [t.clone().requires_grad_(True) for t in (x, A, B)]
    for part in halves:
        assert uses_triton("auto", mine[0][part], mine[1], mine[2], rank=A.shape[1]) == on_triton
        (multi_lora(mine[0][part], mine[1], mine[2], idx[part], 0.7, accumulate=True) * g[part]).sum().backward()
        (reference.multi_lora_forward(theirs[0][part], *theirs[1:], idx[part], 0.7) * g[part]).sum().backward()
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=tolerance, atol=tolerance)
    frozen_a, b_leaf = A.clone(), B.clone().requires_grad_(True)
    for part in halves:
        (multi_lora(x[part], frozen_a, b_leaf, idx[part], 0.7, accumulate=True) * g[part]).sum().backward()
    assert frozen_a.grad is None
    torch.testing.assert_close(b_leaf.grad, theirs[2].grad, rtol=tolerance, atol=tolerance)
    return frozen_a, b_leaf


def test_accumulate_adds_factor_gradients_into_grad_over_chunks():
    """``accumulate=True`` (the batched engine), on the reference path: exactly the float64 gradients autograd
    accumulates over the same chunks (``_accumulated_over_two_chunks``), and a second step starts from
    ``.grad = None`` again."""
    x, A, B, idx, g = _make([2, 0, 1, 2], 2, 3, 2, 3)
    frozen_a, b_leaf = _accumulated_over_two_chunks(x, A, B, idx, g, on_triton=False, tolerance=1e-12)
    b_leaf.grad = None
    (multi_lora(x[:2], frozen_a, b_leaf, idx[:2], 0.7, accumulate=True) * g[:2]).sum().backward()
    want = reference.multi_lora_backward(x[:2], A, B, idx[:2], 0.7, g[:2])[2]
    torch.testing.assert_close(b_leaf.grad, want, rtol=1e-12, atol=1e-12)


def test_backend_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, A, B, idx, g = _make([1, 1], 1, 4, 2, 3, dtype=torch.float32)
    assert not uses_triton("auto", x, A, B, rank=2)
    assert not uses_triton("reference", x, A, B, rank=2)
    with pytest.raises((RuntimeError, ValueError)):
        multi_lora(x, A, B, idx, 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        uses_triton("cuda", x, A, B, rank=2)  # type: ignore[arg-type]
    # The dispatching wrappers fall back to the reference on CPU.
    torch.testing.assert_close(
        multi_lora_backward(x, A, B, idx, 1.0, g)[1], reference.multi_lora_backward(x, A, B, idx, 1.0, g)[1]
    )
    torch.testing.assert_close(
        per_sample_lora_grads(x, A, B, idx, 1.0, g)[0], reference.per_sample_lora_grads(x, A, B, idx, 1.0, g)[0]
    )


def test_kernel_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fedlowrank.kernels import triton_kernels as tk, multi_lora\n"
        "assert tk.TRITON_AVAILABLE is False\n"
        "x, A, B = torch.randn(2, 1, 4), torch.randn(1, 2, 4), torch.randn(1, 3, 2)\n"
        "y = multi_lora(x, A, B, torch.zeros(2, dtype=torch.long), 1.0)\n"
        "assert y.shape == (2, 1, 3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(IN_INTERPRETER_RUN, reason="already inside the interpreter run")
def test_triton_kernels_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{_SUBPROCESS_FLAG: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::TestTritonInterpreted"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    summary = [line for line in tail.splitlines() if line.strip()][-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, tail


@pytest.mark.skipif(not IN_INTERPRETER_RUN, reason="runs in a TRITON_INTERPRET=1 subprocess (see module docstring)")
class TestTritonInterpreted:
    """Each Triton kernel against its reference twin, in Triton's CPU interpreter. Shapes cross the fixed 16-wide
    tiles (T 18, d 40, k 20) so masking and multi-tile loops run."""

    SHAPES = [
        ([2, 0, 3, 1], 3, 6, 2, 5),
        ([4], 2, 5, 3, 4),
        ([0, 1, 0], 1, 4, 2, 3),
        ([1, 3, 2], 18, 40, 4, 20),
        ([2, 1], 2, 9, 17, 7),  # rank above one 16-wide tile
    ]

    @staticmethod
    def _tk():
        from fedlowrank.kernels import triton_kernels

        assert triton_kernels.TRITON_AVAILABLE and triton_kernels.interpret_mode()
        return triton_kernels

    @pytest.mark.parametrize("case", SHAPES)
    def test_forward_kernel(self, case):
        tk = self._tk()
        x, A, B, idx, _ = _make(*case, dtype=torch.float32, seed=4)
        y, h = tk.lora_shrink_expand(x, A, B, idx, 0.5, store_h=True)
        torch.testing.assert_close(y, reference.multi_lora_forward(x, A, B, idx, 0.5), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, torch.bmm(x, A[idx].transpose(1, 2)), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("case", SHAPES)
    def test_backward_kernels(self, case):
        x, A, B, idx, g = _make(*case, dtype=torch.float32, seed=5)
        assert uses_triton("auto", x, A, B, g, rank=A.shape[1])
        w = torch.rand(x.shape[0])
        for weights in (None, w):
            got = multi_lora_backward(x, A, B, idx, 0.5, g, example_weights=weights, backend="triton")
            want = reference.multi_lora_backward(x, A, B, idx, 0.5, g, example_weights=weights)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("case", SHAPES)
    def test_per_sample_kernels(self, case):
        x, A, B, idx, g = _make(*case, dtype=torch.float32, seed=6)
        got = per_sample_lora_grads(x, A, B, idx, 1.3, g, backend="triton")
        want = reference.per_sample_lora_grads(x, A, B, idx, 1.3, g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        norms = per_sample_grad_norms_sq(x, A, B, idx, 1.3, g, backend="triton")
        torch.testing.assert_close(
            norms, reference.per_sample_grad_norms_sq(x, A, B, idx, 1.3, g), rtol=1e-4, atol=1e-5
        )

    def test_autograd_function_uses_triton(self):
        x, A, B, idx, g = _make([2, 0, 3], 3, 6, 2, 5, dtype=torch.float32, seed=7)
        mine = [t.clone().requires_grad_(True) for t in (x, A, B)]
        theirs = [t.clone().requires_grad_(True) for t in (x, A, B)]
        y = multi_lora(*mine, idx, 0.9)  # 'auto' picks Triton under the interpreter
        assert y.grad_fn is not None and "MultiLoRAFunction" in type(y.grad_fn).__name__
        y_ref = reference.multi_lora_forward(*theirs, idx, 0.9)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
        # float64 is not a Triton dtype here: 'auto' falls back to the reference and gradcheck holds.
        x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
        assert torch.autograd.gradcheck(
            lambda a, b, c: MultiLoRAFunction.apply(a, b, c, idx, 0.9, "auto"), (x64, A64, B64)
        )

    def test_accumulate_on_triton(self):
        """``accumulate=True`` on Triton (the batched engine on a GPU): the kernels' whole ∇A and ∇B are added into
        ``.grad`` over chunks, as autograd accumulates the reference's (``_accumulated_over_two_chunks``)."""
        x, A, B, idx, g = _make([2, 0, 1, 2], 3, 6, 2, 5, dtype=torch.float32, seed=9)
        _accumulated_over_two_chunks(x, A, B, idx, g, on_triton=True, tolerance=1e-5)

    def test_strided_inputs_and_bf16(self):
        tk = self._tk()
        x, A, B, idx, _ = _make([2, 1, 2], 4, 6, 3, 5, dtype=torch.float32, seed=8)
        x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
        y, _ = tk.lora_shrink_expand(x_t, A, B, idx.to(torch.int32), 1.0)
        torch.testing.assert_close(y, reference.multi_lora_forward(x, A, B, idx, 1.0), atol=1e-5, rtol=1e-5)
        xb, Ab, Bb = (t.bfloat16() for t in (x, A, B))
        yb = multi_lora(xb, Ab, Bb, idx, 1.0)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), reference.multi_lora_forward(x, A, B, idx, 1.0), atol=5e-2, rtol=5e-2)
