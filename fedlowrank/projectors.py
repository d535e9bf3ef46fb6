"""Gradient projectors for GaLore-style low-rank optimizers and federated low-rank updates.

One projector per 2-D parameter W (m x n). It compresses the smaller side, as GaLore does:

* ``side == "left"``  (m <= n): basis P (m x r), ``down(G) = Pᵀ G`` (r x n), ``up(L) = P L``;
* ``side == "right"`` (m >  n): basis Q (n x r), ``down(G) = G Q`` (m x r), ``up(L) = L Qᵀ``.

The scale α of GaLore is applied by the optimizer, not here.

``refresh(grad, step)`` recomputes the basis on a schedule: at the first call, then whenever
``step - last_refresh >= update_gap`` (``update_gap == 0``: never again, a fixed basis such as a
federated round's shared one). When the basis changes, :meth:`Projector.transition_moments` applies the
declared ``moment_policy`` to the optimizer moments that live in the old coordinates:

* ``keep``   — leave them as they are (GaLore; the coordinates silently change meaning);
* ``reset``  — zero them and restart bias correction;
* ``rotate`` — carry them into the new basis with T = P_newᵀ P_old (r x r; ``down_new ∘ up_old``):
  the first moment exactly, ``m ← T m`` (its projection onto the new span). The second moment cannot be
  rotated exactly: v holds per-coordinate means of squares, and the rotated second moment needs the
  cross-covariances that Adam never stores. We use ``v ← (T ⊙ T) v``, which is exact when the old
  coordinates are uncorrelated (E[(Σ_j T_ij g_j)²] = Σ_j T_ij² E[g_j²] without cross terms), stays
  non-negative, and is exact for coordinate-selecting bases such as DCT (T is then a partial permutation).

Implementations: :class:`SVDProjector` (full or randomized SVD; GaLore, GaLore 2), :class:`GaussianProjector`
(seeded random basis; Flora), :class:`DCTProjector` (top-r DCT-II columns by energy), :class:`IdentityProjector`
(exact, no compression; a baseline), and :func:`refactorize_product` / :class:`LowRankProductProjector` for the
exact SVD of a low-rank product B·A (FedSVD's server step; the single implementation lives in
``fedlowrank.lowrank``).

``state_dict()`` holds only tensors, ints, strings and lists (no objects); ``compact_state()`` is the subset a
peer needs to rebuild the identical basis: the basis itself for SVD, the seed for Gaussian, the column indices
for DCT. :func:`projector_from_state` rebuilds a projector from either.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import Any, ClassVar, Literal

import torch

from fedlowrank.lowrank import refactorize_product

MomentPolicy = Literal["keep", "reset", "rotate"]
Side = Literal["left", "right"]
MOMENT_POLICIES: tuple[str, ...] = ("keep", "reset", "rotate")
PROJECTOR_KINDS: tuple[str, ...] = ("svd", "randomized-svd", "gaussian", "dct", "identity")

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from ints and strings, stable across processes and machines.

    Used for per-refresh and per-parameter seeds, e.g. ``derive_seed(global_seed, round, param_name)``
    (Python's ``hash`` of a string is salted per process, so strings go through crc32).
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        value = zlib.crc32(part.encode()) if isinstance(part, str) else int(part) & _MASK64
        # splitmix64 finalizer over the running state: well mixed, cheap, reproducible.
        state = (state ^ value) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state & ((1 << 63) - 1)


def choose_side(shape: tuple[int, int] | torch.Size) -> Side:
    """Compress the smaller dimension: left (basis m x r) when m <= n, else right (basis n x r)."""
    m, n = int(shape[0]), int(shape[1])
    return "left" if m <= n else "right"


def _check_2d(tensor: torch.Tensor, what: str = "gradient") -> None:
    if tensor.dim() != 2:
        raise ValueError(f"projectors work on 2-D matrices; the {what} has shape {tuple(tensor.shape)}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Decompositions need float32 at least (bf16/fp16 SVD is unsupported or too inaccurate).
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in projector state")
    return dtype


class Projector(ABC):
    """Base class: schedule, side, down/up, moment transition and state; subclasses build the basis."""

    kind: ClassVar[str]

    def __init__(self, rank: int, update_gap: int = 200, seed: int = 0, moment_policy: MomentPolicy = "keep") -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not isinstance(update_gap, int) or update_gap < 0:
            raise ValueError(f"update_gap must be an integer >= 0 (0 = never refresh again), got {update_gap!r}")
        if moment_policy not in MOMENT_POLICIES:
            raise ValueError(f"unknown moment_policy {moment_policy!r}; use one of {', '.join(MOMENT_POLICIES)}")
        self.rank = rank
        self.update_gap = update_gap
        self.seed = int(seed)
        self.moment_policy: MomentPolicy = moment_policy
        self.shape: tuple[int, int] | None = None
        self.side: Side | None = None
        self.last_refresh: int | None = None  # step at which the current basis was built
        self.basis: torch.Tensor | None = None  # (m x r) for left, (n x r) for right
        self._transition: torch.Tensor | None = None  # P_newᵀ P_old of the latest refresh, until consumed
        self._due = False

    # ---- schedule ----------------------------------------------------------------------------------------
    @property
    def effective_rank(self) -> int:
        """``rank`` clipped to the compressed dimension (a rank above min(m, n) cannot be represented)."""
        if self.shape is None:
            return self.rank
        return min(self.rank, min(self.shape))

    def needs_refresh(self, step: int) -> bool:
        if self.basis is None or self._due or self.last_refresh is None:
            return True
        if self.update_gap == 0:
            return False
        return step - self.last_refresh >= self.update_gap

    def invalidate(self) -> None:
        """Make the next :meth:`refresh` rebuild the basis whatever the schedule (e.g. at a new round)."""
        self._due = True

    def refresh(self, grad: torch.Tensor, step: int) -> bool:
        """Rebuild the basis from ``grad`` if the schedule says so; True when it was (re)built.

        After a rebuild that replaced an earlier basis, :meth:`transition` holds T = P_newᵀ P_old.
        """
        _check_2d(grad)
        shape = (int(grad.shape[0]), int(grad.shape[1]))
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"projector was built for shape {self.shape}, got a gradient of shape {shape}")
        if not self.needs_refresh(step):
            return False
        self.shape = shape
        self.side = choose_side(shape)
        old = self.basis
        new = self._build(grad.detach(), step)
        self.basis = new
        self.last_refresh = int(step)
        self._due = False
        self._transition = None if old is None else new.T.to(old.dtype) @ old
        return True

    @abstractmethod
    def _build(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The new basis (dim x effective_rank) for the compressed side, given the gradient and step."""

    # ---- projection ----------------------------------------------------------------------------------------
    def _require_basis(self) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError("projector has no basis yet: call refresh(grad, step) or load_state_dict first")
        return self.basis

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        """m x n -> r x n (left) or m x r (right)."""
        basis = self._require_basis()
        _check_2d(grad)
        if self.shape is not None and tuple(grad.shape) != self.shape:
            raise ValueError(f"projector shape is {self.shape}, got a matrix of shape {tuple(grad.shape)}")
        basis = basis.to(grad.dtype)
        return basis.T @ grad if self.side == "left" else grad @ basis

    def up(self, low_rank: torch.Tensor) -> torch.Tensor:
        """r x n (left) or m x r (right) -> m x n."""
        basis = self._require_basis().to(low_rank.dtype)
        return basis @ low_rank if self.side == "left" else low_rank @ basis.T

    def low_rank_shape(self) -> tuple[int, int]:
        if self.shape is None:
            raise RuntimeError("projector has no shape yet")
        m, n = self.shape
        r = self.effective_rank
        return (r, n) if self.side == "left" else (m, r)

    # ---- moments on a basis change -------------------------------------------------------------------------
    def transition(self) -> torch.Tensor | None:
        """T = P_newᵀ P_old (r x r) of the latest refresh, or None before any basis change."""
        return self._transition

    def transition_moments(
        self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Apply ``moment_policy`` after a basis change: (first moment, second moment, restart bias correction)."""
        if self.moment_policy == "keep" or self._transition is None:
            return exp_avg, exp_avg_sq, False
        if self.moment_policy == "reset":
            return torch.zeros_like(exp_avg), torch.zeros_like(exp_avg_sq), True
        m, v = rotate_moments(exp_avg, exp_avg_sq, self._transition, self.side or "left")
        return m, v, False

    # ---- state -------------------------------------------------------------------------------------------
    def _base_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "rank": self.rank,
            "update_gap": self.update_gap,
            "seed": self.seed,
            "moment_policy": self.moment_policy,
            "shape": None if self.shape is None else list(self.shape),
            "side": self.side,
            "last_refresh": self.last_refresh,
            "due": self._due,
            "dtype": None if self.basis is None else str(self.basis.dtype).removeprefix("torch."),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore this projector exactly: tensors, ints, strings and lists only."""
        state = self._base_state()
        state.update(self._extra_state(compact=False))
        return state

    def compact_state(self) -> dict[str, Any]:
        """What a peer needs to rebuild the same basis (what would be sent over the wire)."""
        state = {
            "kind": self.kind,
            "rank": self.rank,
            "shape": None if self.shape is None else list(self.shape),
            "last_refresh": self.last_refresh,
            "dtype": None if self.basis is None else str(self.basis.dtype).removeprefix("torch."),
        }
        state.update(self._extra_state(compact=True))
        return state

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Restore from :meth:`state_dict` or :meth:`compact_state` (then the schedule fields keep their values)."""
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"state is for a {state['kind']!r} projector, this one is {self.kind!r}")
        for key in ("rank", "update_gap", "seed", "moment_policy"):
            if key in state:
                setattr(self, key, state[key])
        shape = state.get("shape")
        self.shape = None if shape is None else (int(shape[0]), int(shape[1]))
        self.side = state.get("side") or (None if self.shape is None else choose_side(self.shape))
        self.last_refresh = state.get("last_refresh")
        self._due = bool(state.get("due", False))
        self._transition = None
        self.basis = None
        if self.shape is not None and state.get("dtype") is not None:
            dtype = _dtype_from_name(state["dtype"])
            self.basis = self._restore_basis(state, dtype, torch.device(device) if device is not None else None)

    def _extra_state(self, compact: bool) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _restore_basis(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        """Rebuild the basis from a state (the compact fields suffice)."""

    def basis_nbytes(self) -> int:
        return 0 if self.basis is None else self.basis.numel() * self.basis.element_size()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, update_gap={self.update_gap}, seed={self.seed}, "
            f"moment_policy={self.moment_policy!r}, shape={self.shape}, side={self.side})"
        )


def rotate_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, transition: torch.Tensor, side: Side
) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry Adam moments from old to new projected coordinates with T = P_newᵀ P_old.

    First moment exactly (m ← T m, or m Tᵀ on the right side); second moment by v ← (T⊙T) v, the
    uncorrelated-coordinates approximation described in the module docstring (exact for permutations).
    """
    t = transition.to(exp_avg.dtype)
    t2 = (t * t).to(exp_avg_sq.dtype)
    if side == "left":
        return t @ exp_avg, t2 @ exp_avg_sq
    return exp_avg @ t.T, exp_avg_sq @ t2.T


class SVDProjector(Projector):
    """GaLore: the top-r singular vectors of the gradient on the compressed side.

    ``randomized=False``: ``torch.linalg.svd`` (exact, O(m n min(m, n))). ``randomized=True``: a seeded
    randomized range finder (Halko et al.) with ``oversample`` extra columns and ``niter`` power
    iterations, O(m n (r + p)) per pass; the test matrix is drawn on the CPU from
    ``derive_seed(seed, step)`` so the basis does not depend on the device's generator.
    The basis itself is the compact state (r·dim numbers): it depends on the gradient, which peers lack.
    """

    kind: ClassVar[str] = "svd"

    def __init__(self, *args: Any, randomized: bool = False, oversample: int = 8, niter: int = 2, **base: Any) -> None:
        """``Projector``'s arguments (rank, update_gap, seed, moment_policy), then the randomized SVD's."""
        super().__init__(*args, **base)
        if oversample < 0 or niter < 0:
            raise ValueError("oversample and niter must be >= 0")
        self.randomized = randomized
        self.oversample = oversample
        self.niter = niter
        if randomized:
            self.kind = "randomized-svd"  # instance attribute: the factory/state name

    def _build(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        matrix = grad.to(_work_dtype(grad.dtype))
        # Left singular vectors of G (left side) or of Gᵀ (right side): the compressed dimension's basis.
        if self.side == "right":
            matrix = matrix.T
        r = self.effective_rank
        if self.randomized and r + self.oversample < min(matrix.shape):
            basis = randomized_left_singular_vectors(
                matrix, r, self.oversample, self.niter, derive_seed(self.seed, step, "rsvd")
            )
        else:
            u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
            basis = u[:, :r]
        return basis.to(grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32).contiguous()

    def _extra_state(self, compact: bool) -> dict[str, Any]:
        extra: dict[str, Any] = {"basis": None if self.basis is None else self.basis.detach().clone()}
        if not compact:
            extra.update(randomized=self.randomized, oversample=self.oversample, niter=self.niter)
        return extra

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        for key in ("randomized", "oversample", "niter"):
            if key in state:
                setattr(self, key, state[key])
        self.kind = "randomized-svd" if self.randomized else "svd"
        super().load_state_dict(state, device)

    def _restore_basis(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        basis = state.get("basis")
        if basis is None:
            raise ValueError("an SVD projector's state must carry its basis")
        return basis.to(dtype=dtype, device=device if device is not None else basis.device).clone()


def randomized_left_singular_vectors(
    matrix: torch.Tensor, rank: int, oversample: int = 8, niter: int = 2, seed: int = 0
) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``matrix`` (a x b) by a seeded randomized range finder.

    Y = M Ω with Ω Gaussian (b x (rank + oversample)), ``niter`` QR-stabilised power iterations
    (Y ← M Mᵀ Y), Q = qr(Y), then the SVD of the small Qᵀ M. Orthonormal columns up to float rounding.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    k = min(rank + oversample, min(matrix.shape))
    omega = torch.randn(matrix.shape[1], k, generator=generator, dtype=matrix.dtype).to(matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(niter):
        z, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ z)
    u_small, _, _ = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u_small[:, :rank]).contiguous()


class GaussianProjector(Projector):
    """Flora-style random basis, regenerated from ``derive_seed(seed, step_of_refresh)``; ignores the gradient.

    ``orthonormal=True`` (default): the QR factor of a Gaussian matrix, sign-fixed so it is unique (a Haar
    random basis; PᵀP = I, so up∘down is an orthogonal projection — needed for exact federated aggregation
    and for the ``rotate`` policy). ``orthonormal=False``: i.i.d. N(0, 1/r) entries as in Flora, so that
    E[P Pᵀ] = I (up∘down is an unbiased but noisy estimate of the identity, not a projection).
    With the scaled variant, the ``rotate`` policy's T = P_newᵀ P_old is Flora's moment transfer
    M ← down_new(up_old(M)) rather than a change of orthonormal basis.
    Drawn on the CPU in float64, then cast and moved, so every device and peer gets the same basis from the seed.
    Compact state: seed, shape, the refresh step (and the two flags).
    """

    kind: ClassVar[str] = "gaussian"

    def __init__(self, *args: Any, orthonormal: bool = True, **base: Any) -> None:
        """``Projector``'s arguments (rank, update_gap, seed, moment_policy), then ``orthonormal``."""
        super().__init__(*args, **base)
        self.orthonormal = orthonormal

    def _generate(self, step: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        if self.shape is None or self.side is None:
            raise RuntimeError("Gaussian projector needs its shape")
        dim = self.shape[0] if self.side == "left" else self.shape[1]
        r = self.effective_rank
        generator = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, step, "gaussian"))
        gaussian = torch.randn(dim, r, generator=generator, dtype=torch.float64)
        if self.orthonormal:
            q, upper = torch.linalg.qr(gaussian)
            basis = q * torch.sign(torch.diagonal(upper)).where(torch.diagonal(upper) != 0, 1.0)
        else:
            basis = gaussian / math.sqrt(r)
        return basis.to(dtype=dtype, device=device).contiguous()

    def _build(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        dtype = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
        return self._generate(step, dtype, grad.device)

    def _extra_state(self, compact: bool) -> dict[str, Any]:
        return {"seed": self.seed, "orthonormal": self.orthonormal, "side": self.side}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        if "orthonormal" in state:
            self.orthonormal = bool(state["orthonormal"])
        super().load_state_dict(state, device)

    def _restore_basis(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        if self.last_refresh is None:
            raise ValueError("a Gaussian projector's state needs the step of its last refresh")
        return self._generate(int(self.last_refresh), dtype, device)


@lru_cache(maxsize=32)
def _dct_matrix_cpu(size: int) -> torch.Tensor:
    index = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(math.pi * (index[:, None] + 0.5) * index[None, :] / size) * math.sqrt(2.0 / size)
    basis[:, 0] /= math.sqrt(2.0)
    return basis


def dct_basis(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal DCT-II basis (size x size): column k is cos(π (i + ½) k / size), normalised.

    Computed once per size in float64 on the CPU (cached) and cast, so every peer builds the same matrix.
    """
    return _dct_matrix_cpu(int(size)).to(dtype=dtype, device=device)


class DCTProjector(Projector):
    """A fixed DCT-II basis; each refresh keeps the r columns with the largest gradient energy.

    With D orthonormal, the energy kept by columns S is Σ_{k∈S} ‖(Dᵀ G)_k‖² (rows of DᵀG on the left side,
    columns of G D on the right), so picking the r largest is the best choice of r DCT columns in
    Frobenius norm. Indices are stored sorted ascending (a canonical order). Compact state: the indices.
    The full DCT matrix is built per refresh (and per restore) from the cached CPU copy, and only the r
    selected columns are kept on the projector.
    """

    kind: ClassVar[str] = "dct"

    def __init__(self, rank: int, update_gap: int = 200, seed: int = 0, moment_policy: MomentPolicy = "keep") -> None:
        super().__init__(rank, update_gap, seed, moment_policy)
        self.indices: torch.Tensor | None = None

    def _build(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        dtype = _work_dtype(grad.dtype)
        matrix = grad.to(dtype)
        assert self.side is not None and self.shape is not None
        dim = self.shape[0] if self.side == "left" else self.shape[1]
        full = dct_basis(dim, dtype, grad.device)
        coefficients = full.T @ matrix if self.side == "left" else matrix @ full
        energy = coefficients.square().sum(dim=1 if self.side == "left" else 0)
        top = torch.topk(energy, self.effective_rank).indices
        self.indices = torch.sort(top).values.cpu()
        return full[:, self.indices.to(grad.device)].contiguous()

    def _extra_state(self, compact: bool) -> dict[str, Any]:
        return {"indices": None if self.indices is None else self.indices.tolist(), "side": self.side}

    def _restore_basis(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        indices = state.get("indices")
        if indices is None:
            raise ValueError("a DCT projector's state must carry its column indices")
        assert self.shape is not None and self.side is not None
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        dim = self.shape[0] if self.side == "left" else self.shape[1]
        return dct_basis(dim, dtype, device)[:, self.indices.to(device)].contiguous()

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        self.indices = None
        super().load_state_dict(state, device)


class IdentityProjector(Projector):
    """The identity basis (full rank, no compression): GaLoreAdamW with it is exactly AdamW.

    Useful as a baseline and to test the optimizer machinery; ``rank`` is ignored (always min(m, n)).
    ``down``/``up`` skip the matmul.
    """

    kind: ClassVar[str] = "identity"

    @property
    def effective_rank(self) -> int:
        return self.rank if self.shape is None else min(self.shape)

    def _build(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        assert self.shape is not None
        return torch.eye(min(self.shape), dtype=_work_dtype(grad.dtype), device=grad.device)

    def down(self, grad: torch.Tensor) -> torch.Tensor:
        self._require_basis()
        return grad

    def up(self, low_rank: torch.Tensor) -> torch.Tensor:
        self._require_basis()
        return low_rank

    def _restore_basis(self, state: dict[str, Any], dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        assert self.shape is not None
        return torch.eye(min(self.shape), dtype=dtype, device=device)


class LowRankProductProjector:
    """The exact SVD of a low-rank product M = B·A (B: m x k, A: k x n) without forming M.

    ``refresh(B, A)`` runs :func:`refactorize_product` (thin QRs + a k x k SVD, O((m + n) k²)) and keeps
    A_new (orthonormal rows) as the basis of M's row space: ``down(X) = X A_newᵀ`` and ``up(L) = L A_new``.
    For M itself, ``down(M)`` equals B_new = U·S, so FedSVD's server step is ``B_new, A_new = refresh(B̄, A)``.
    """

    kind: ClassVar[str] = "lowrank-product"

    def __init__(self, rank: int | None = None) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.basis: torch.Tensor | None = None  # A_new: (r x n), orthonormal rows

    def refresh(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_2d(B, "B factor")
        _check_2d(A, "A factor")
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"B·A needs matching inner dimensions, got {tuple(B.shape)} and {tuple(A.shape)}")
        b_new, a_new = refactorize_product(B, A)
        if self.rank is not None:
            b_new, a_new = b_new[:, : self.rank].contiguous(), a_new[: self.rank].contiguous()
        self.basis = a_new
        return b_new, a_new

    def down(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError("call refresh(B, A) first")
        return matrix @ self.basis.T.to(matrix.dtype)

    def up(self, low_rank: torch.Tensor) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError("call refresh(B, A) first")
        return low_rank @ self.basis.to(low_rank.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "basis": None if self.basis is None else self.basis.clone()}

    compact_state = state_dict

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        self.rank = state.get("rank")
        basis = state.get("basis")
        self.basis = None if basis is None else basis.to(device=device if device is not None else basis.device)


def state_nbytes(state: Any) -> int:
    """Approximate wire size of a (compact) projector state: tensor bytes, 8 per int/float, 4 per list item
    of ints (int32 indices), the UTF-8 length of strings."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(4 if isinstance(item, int) else state_nbytes(item) for item in state)
    if isinstance(state, str):
        return len(state.encode())
    if isinstance(state, (int, float)):
        return 8
    return 0


_CLASSES: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "randomized-svd": SVDProjector,
    "gaussian": GaussianProjector,
    "dct": DCTProjector,
    "identity": IdentityProjector,
}


def make_projector(
    kind: str, rank: int, update_gap: int = 200, seed: int = 0, moment_policy: MomentPolicy = "keep", **options: Any
) -> Projector:
    """Build a projector by name: "svd", "randomized-svd", "gaussian", "dct" (or "identity").

    ``options``: ``oversample``/``niter`` for "randomized-svd", ``orthonormal`` for "gaussian".
    Raises ValueError for an unknown kind, rank < 1, a negative gap, an unknown policy or option.
    """
    if kind not in _CLASSES:
        raise ValueError(f"unknown projector kind {kind!r}; use one of {', '.join(PROJECTOR_KINDS)}")
    allowed = {"randomized-svd": {"oversample", "niter"}, "gaussian": {"orthonormal"}}.get(kind, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"projector {kind!r} takes no option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if kind == "randomized-svd":
        return SVDProjector(rank, update_gap, seed, moment_policy, randomized=True, **options)
    return _CLASSES[kind](rank, update_gap, seed, moment_policy, **options)


def projector_from_state(state: dict[str, Any], device: torch.device | str | None = None) -> Projector:
    """Rebuild a projector from its ``state_dict()`` or ``compact_state()``."""
    kind = state.get("kind")
    if kind not in _CLASSES:
        raise ValueError(f"unknown projector kind {kind!r} in state")
    options: dict[str, Any] = {}
    if kind == "gaussian" and "orthonormal" in state:
        options["orthonormal"] = bool(state["orthonormal"])
    projector = make_projector(kind, int(state.get("rank", 1)), int(state.get("update_gap", 200)), **options)
    projector.load_state_dict(state, device)
    return projector


__all__ = [
    "MOMENT_POLICIES",
    "PROJECTOR_KINDS",
    "DCTProjector",
    "GaussianProjector",
    "IdentityProjector",
    "LowRankProductProjector",
    "MomentPolicy",
    "Projector",
    "SVDProjector",
    "choose_side",
    "dct_basis",
    "derive_seed",
    "make_projector",
    "projector_from_state",
    "randomized_left_singular_vectors",
    "refactorize_product",
    "rotate_moments",
    "state_nbytes",
]
