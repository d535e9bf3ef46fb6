"""Projectors: orthonormal bases, optimal energy, schedules, moment transitions, compact and full state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedlowrank import lowrank
from fedlowrank.projectors import (
    DCTProjector,
    GaussianProjector,
    LowRankProductProjector,
    Projector,
    SVDProjector,
    dct_basis,
    derive_seed,
    make_projector,
    projector_from_state,
    randomized_left_singular_vectors,
    refactorize_product,
    rotate_moments,
    state_nbytes,
)

ORTHONORMAL_KINDS = ["svd", "randomized-svd", "gaussian", "dct"]
SHAPES = [(24, 40), (50, 18)]  # left side (m <= n) and right side (m > n)


def _matrix(shape: tuple[int, int], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _power_law(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A matrix with random singular vectors and singular values k^-1.5 (a gradient-like spectrum)."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(_matrix((m, k), seed))
    v, _ = torch.linalg.qr(_matrix((n, k), seed + 1))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.5
    return (u * s) @ v.T


def _project(projector: Projector, grad: torch.Tensor) -> torch.Tensor:
    return projector.up(projector.down(grad))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ORTHONORMAL_KINDS)
def test_bases_are_orthonormal_on_the_smaller_side(kind, shape):
    grad = _power_law(shape)
    projector = make_projector(kind, 6, update_gap=10, seed=1)
    assert projector.refresh(grad, 0)
    m, n = shape
    side_dim = min(m, n)
    assert projector.side == ("left" if m <= n else "right")
    assert projector.basis is not None and tuple(projector.basis.shape) == (side_dim, 6)
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(projector.basis.T @ projector.basis, eye, atol=1e-10)
    low = projector.down(grad)
    assert tuple(low.shape) == ((6, n) if m <= n else (m, 6))
    assert tuple(projector.up(low).shape) == shape
    # up∘down is the orthogonal projection onto the basis's span: idempotent, and it never adds energy.
    once = _project(projector, grad)
    assert torch.allclose(_project(projector, once), once, atol=1e-10)
    assert once.norm() <= grad.norm() + 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_keeps_the_optimal_energy_and_randomized_svd_matches_it(shape):
    grad = _power_law(shape, seed=3)
    r = 5
    best = float((torch.linalg.svdvals(grad)[:r] ** 2).sum())
    exact = make_projector("svd", r)
    exact.refresh(grad, 0)
    assert float(exact.down(grad).square().sum()) == pytest.approx(best, rel=1e-10)
    randomized = make_projector("randomized-svd", r, seed=4, niter=2, oversample=4)
    randomized.refresh(grad, 0)
    assert float(randomized.down(grad).square().sum()) == pytest.approx(best, rel=1e-3)


def test_randomized_svd_is_exact_on_a_low_rank_matrix_and_seeded():
    grad = _matrix((60, 5), 1) @ _matrix((5, 80), 2)  # rank 5
    state_before = torch.get_rng_state()
    a = randomized_left_singular_vectors(grad, 5, oversample=3, niter=1, seed=9)
    b = randomized_left_singular_vectors(grad, 5, oversample=3, niter=1, seed=9)
    assert torch.equal(torch.get_rng_state(), state_before)  # a private generator, not the global one
    assert torch.equal(a, b)
    assert torch.allclose(a @ (a.T @ grad), grad, atol=1e-9)


def test_dct_basis_is_the_orthonormal_dct_ii():
    size = 12
    basis = dct_basis(size, torch.float64)
    assert torch.allclose(basis.T @ basis, torch.eye(size, dtype=torch.float64), atol=1e-12)
    # Column k of the DCT-II basis, written out independently: sqrt(c_k / N) cos(pi (2i + 1) k / 2N).
    for k in (0, 1, 5, 11):
        c = 1.0 if k == 0 else 2.0
        expected = torch.tensor(
            [math.sqrt(c / size) * math.cos(math.pi * (2 * i + 1) * k / (2 * size)) for i in range(size)],
            dtype=torch.float64,
        )
        assert torch.allclose(basis[:, k], expected, atol=1e-12)
    # The transform of a signal is basisᵀ x; scipy's orthonormal DCT-II must agree.
    scipy_fft = pytest.importorskip("scipy.fft")
    signal = _matrix((size, 1), 5)[:, 0]
    expected = torch.from_numpy(scipy_fft.dct(signal.numpy(), type=2, norm="ortho"))
    assert torch.allclose(basis.T @ signal, expected, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_dct_picks_the_columns_with_the_most_energy(shape):
    m, n = shape
    left = m <= n
    dim = m if left else n
    full = dct_basis(dim, torch.float64)
    chosen = [1, 4, 7]
    coefficients = _matrix((3, n if left else m), 2)
    # A gradient made of exactly three DCT columns is captured exactly, and those columns are found.
    grad = full[:, chosen] @ coefficients if left else coefficients.T @ full[:, chosen].T
    projector = make_projector("dct", 3)
    projector.refresh(grad, 0)
    assert projector.indices is not None and projector.indices.tolist() == chosen
    assert torch.allclose(_project(projector, grad), grad, atol=1e-10)
    # On a generic gradient, the kept energy is the sum of the r largest coefficient energies (the optimum).
    grad = _power_law(shape, seed=7)
    energy = (full.T @ grad).square().sum(1) if left else (grad @ full).square().sum(0)
    projector = make_projector("dct", 4)
    projector.refresh(grad, 0)
    kept = float(projector.down(grad).square().sum())
    assert kept == pytest.approx(float(energy.topk(4).values.sum()), rel=1e-10)


def test_gaussian_scaled_variant_is_unbiased_not_orthonormal():
    projector = GaussianProjector(64, seed=5, orthonormal=False)
    projector.refresh(torch.zeros(2000, 3000), 0)
    basis = projector.basis.double()
    # Entries N(0, 1/r): each row of P has squared norm ≈ 1, so E[P Pᵀ] = I; PᵀP ≈ (dim / r)·I is not I.
    assert float((basis.square().sum(1)).mean()) == pytest.approx(1.0, abs=0.02)
    assert float(basis.std()) == pytest.approx(1 / math.sqrt(64), rel=0.02)
    assert not torch.allclose(basis.T @ basis, torch.eye(64, dtype=torch.float64), atol=0.1)


def test_schedule_refreshes_every_gap_and_fixed_bases_never_refresh():
    grad = _matrix((10, 20), 0)
    projector = make_projector("gaussian", 3, update_gap=10, seed=2)
    refreshed = [step for step in range(25) if projector.refresh(grad, step)]
    assert refreshed == [0, 10, 20]
    fixed = make_projector("gaussian", 3, update_gap=0, seed=2)
    assert [step for step in range(25) if fixed.refresh(grad, step)] == [0]
    fixed.invalidate()
    assert fixed.refresh(grad, 30) and not fixed.refresh(grad, 31)
    # A new Gaussian basis per refresh (seeded by the step), the same one for the same seed and step.
    first, second = make_projector("gaussian", 3, seed=2), make_projector("gaussian", 3, seed=2)
    first.refresh(grad, 0)
    second.refresh(grad, 0)
    assert torch.equal(first.basis, second.basis)
    before = first.basis.clone()
    first.invalidate()
    first.refresh(grad, 1)
    assert not torch.allclose(first.basis, before)
    other_seed = make_projector("gaussian", 3, seed=3)
    other_seed.refresh(grad, 0)
    assert not torch.allclose(other_seed.basis, before)


@pytest.mark.parametrize("kind", ["gaussian", "dct"])
@pytest.mark.parametrize("shape", SHAPES)
def test_seed_and_index_projectors_rebuild_from_their_compact_state_alone(kind, shape):
    projector = make_projector(kind, 5, update_gap=100, seed=11)
    projector.refresh(_power_law(shape, 2).float(), 400)
    compact = projector.compact_state()
    # No basis travels: the Gaussian state has no tensor at all, DCT's has r integer indices.
    tensors = [v for v in compact.values() if isinstance(v, torch.Tensor)]
    assert tensors == []
    if kind == "dct":
        assert len(compact["indices"]) == 5 and all(isinstance(i, int) for i in compact["indices"])
    assert state_nbytes(compact) < 200 < projector.basis_nbytes()
    rebuilt = projector_from_state(compact)
    assert torch.equal(rebuilt.basis, projector.basis)
    grad = _matrix(shape, 8, torch.float32)
    assert torch.equal(rebuilt.down(grad), projector.down(grad))


@pytest.mark.parametrize("kind", ["svd", "randomized-svd", "gaussian", "dct", "identity"])
def test_state_dict_round_trips_through_a_weights_only_load(kind):
    projector = make_projector(kind, 4, update_gap=7, seed=3, moment_policy="rotate")
    grad = _power_law((16, 30), 1).float()
    projector.refresh(grad, 0)
    projector.refresh(grad * 2 + 1, 7)
    buffer = io.BytesIO()
    torch.save(projector.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # only tensors and plain Python values inside
    restored = projector_from_state(state)
    assert type(restored) is type(projector) and restored.kind == projector.kind
    for attr in ("rank", "update_gap", "seed", "moment_policy", "shape", "side", "last_refresh"):
        assert getattr(restored, attr) == getattr(projector, attr), attr
    assert torch.equal(restored.basis, projector.basis)
    # Same schedule afterwards: no refresh before step 14, one at 14.
    assert not restored.refresh(grad, 13) and restored.refresh(grad, 14)


def test_transition_and_moment_policies():
    grad_old, grad_new = _power_law((12, 20), 1), _power_law((12, 20), 2)
    for policy in ("keep", "reset", "rotate"):
        projector = make_projector("svd", 4, update_gap=1, moment_policy=policy)
        projector.refresh(grad_old, 0)
        old_basis = projector.basis.clone()
        assert projector.transition() is None
        m, v = projector.down(grad_old), projector.down(grad_old).square()
        projector.refresh(grad_new, 1)
        transition = projector.transition()
        assert torch.allclose(transition, projector.basis.T @ old_basis)
        new_m, new_v, restart = projector.transition_moments(m, v)
        if policy == "keep":
            assert new_m is m and new_v is v and not restart
        elif policy == "reset":
            assert restart and not new_m.any() and not new_v.any()
        else:
            assert not restart
            # First moment: exactly the projection of the old full-space moment onto the new span.
            assert torch.allclose(projector.up(new_m), projector.up(projector.down(old_basis @ m)), atol=1e-12)
            # Second moment: (T⊙T) v, non-negative.
            assert torch.allclose(new_v, transition.square() @ v) and bool((new_v >= 0).all())


def test_rotation_is_exact_for_dct_index_changes():
    # Old columns {0, 1, 2}, new columns {1, 2, 3}: T is a partial permutation, so both moments carry exactly.
    full = dct_basis(8, torch.float64)
    projector = DCTProjector(3, update_gap=1, moment_policy="rotate")
    coefficients = _matrix((3, 10), 4)  # an 8 x 10 gradient: left side, DCT of size 8
    projector.refresh(full[:, [0, 1, 2]] @ coefficients, 0)
    m = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64).expand(3, 5).clone()
    v = m.square()
    projector.refresh(full[:, [1, 2, 3]] @ coefficients, 1)
    assert projector.indices.tolist() == [1, 2, 3]
    new_m, new_v, _ = projector.transition_moments(m, v)
    assert torch.allclose(new_m[:, 0], torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.allclose(new_v[:, 0], torch.tensor([4.0, 9.0, 0.0], dtype=torch.float64))
    # The right-side variant multiplies from the right.
    m_right = m.T.contiguous()
    rotated, _ = rotate_moments(m_right, m_right.square(), projector.transition(), "right")
    assert torch.allclose(rotated, new_m.T)


def test_lowrank_product_refactorization_is_the_single_shared_implementation():
    assert refactorize_product is lowrank.refactorize_product
    b, a = _matrix((30, 4), 1), _matrix((4, 50), 2)
    projector = LowRankProductProjector()
    b_new, a_new = projector.refresh(b, a)
    assert torch.allclose(b_new @ a_new, b @ a, atol=1e-10)
    assert torch.allclose(a_new @ a_new.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    # Columns of B_new are U·S: orthogonal, with decreasing norms (the singular values).
    gram = b_new.T @ b_new
    assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-9)
    assert torch.allclose(projector.down(b @ a), b_new, atol=1e-10)
    assert torch.allclose(projector.up(projector.down(b @ a)), b @ a, atol=1e-10)
    truncated = LowRankProductProjector(rank=2)
    b2, a2 = truncated.refresh(b, a)
    assert b2.shape == (30, 2) and a2.shape == (2, 50)


def test_factory_and_inputs_are_validated():
    with pytest.raises(ValueError, match="rank"):
        make_projector("svd", 0)
    with pytest.raises(ValueError, match="unknown projector kind"):
        make_projector("qr", 4)
    with pytest.raises(ValueError, match="update_gap"):
        make_projector("dct", 4, update_gap=-1)
    with pytest.raises(ValueError, match="moment_policy"):
        make_projector("dct", 4, moment_policy="rescale")
    with pytest.raises(ValueError, match="option"):
        make_projector("svd", 4, niter=3)
    projector = make_projector("svd", 4)
    with pytest.raises(ValueError, match="2-D"):
        projector.refresh(torch.zeros(5), 0)
    with pytest.raises(RuntimeError, match="no basis"):
        projector.down(torch.zeros(4, 4))
    projector.refresh(torch.randn(6, 9), 0)
    with pytest.raises(ValueError, match="shape"):
        projector.refresh(torch.randn(9, 6), 1)
    with pytest.raises(ValueError, match="2-D"):
        LowRankProductProjector().refresh(torch.zeros(3), torch.zeros(3, 3))
    # A rank above the smaller side is clipped to it (the projection is then exact).
    big = SVDProjector(50)
    grad = _matrix((6, 9), 3)
    big.refresh(grad, 0)
    assert big.effective_rank == 6 and torch.allclose(_project(big, grad), grad, atol=1e-10)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, "layer.0.query.weight") == derive_seed(0, 1, "layer.0.query.weight")
    seeds = {derive_seed(0, r, name) for r in range(5) for name in ("a", "b", "c")}
    assert len(seeds) == 15
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: the same value on every machine and process (no salted hash()).
    assert derive_seed(0, 1, "a") == 5428832022602239310
