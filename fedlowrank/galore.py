"""GaLore-style AdamW: Adam moments live in a low-rank projected space for selected 2-D weights.

Parameter groups marked ``{"galore": True, "rank": r, "update_gap": T, "scale": α, "projector": kind,
"moment_policy": "keep" | "reset" | "rotate"}`` get, per 2-D parameter W (m x n) with gradient G:

    R = down(G)                       (r x n or m x r; see fedlowrank.projectors)
    m, v ← Adam moments of R           (bias-corrected with the moment step count)
    W ← W·(1 − lr·wd) − lr·α·up(m̂ / (√v̂ + ε))

The projector refreshes its basis every T steps (step 0, T, 2T, …) and the moments follow its declared
``moment_policy``. Weight decay is decoupled and applied in full space, before the update, as in
``torch.optim.AdamW``; bias correction is torch's. Every other group, and 1-D parameters everywhere, get
ordinary AdamW with torch's exact arithmetic (so a model can mix both). With the identity projector and
α = 1 the optimizer equals ``torch.optim.AdamW`` step for step.

Note: with an SVD basis at full rank the update is *not* AdamW's: Adam's per-coordinate normalisation is not
rotation invariant, so P·Adam(PᵀG) ≠ Adam(G) unless P is a signed permutation. The tests check both facts.

``moment_bits=8`` stores moments blockwise-quantized with bitsandbytes (dynamic 8-bit map, as its 8-bit
Adam; tensors under 4096 elements stay 32-bit). bitsandbytes is optional and imported only when asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fedlowrank.projectors import (
    MOMENT_POLICIES,
    PROJECTOR_KINDS,
    Projector,
    derive_seed,
    make_projector,
    projector_from_state,
    state_nbytes,
)

HEAD_MODULES: tuple[str, ...] = ("classifier", "score", "lm_head")
_QUANT_MIN_NUMEL = 4096
_QUANT_BLOCKSIZE = 2048


def _bitsandbytes_functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:  # optional dependency
        raise ImportError(
            "8-bit optimizer moments (moment_bits=8) need the optional package bitsandbytes: "
            "pip install bitsandbytes, or use moment_bits=32"
        ) from exc
    return bnb_functional


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with low-rank projected moments for groups marked ``galore=True`` (see the module docstring).

    Group keys (defaults from the constructor): ``lr``, ``betas``, ``eps``, ``weight_decay``, ``galore``,
    ``rank``, ``update_gap``, ``scale``, ``projector`` (kind for :func:`make_projector`), ``moment_policy``,
    ``seed`` (per-parameter seeds are ``derive_seed(seed, parameter index)``), ``projector_options``
    (dict passed to the projector), ``moment_bits`` (32 or 8).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int = 128,
        update_gap: int = 200,
        scale: float = 0.25,
        projector: str = "svd",
        moment_policy: str = "keep",
        seed: int = 0,
        projector_options: dict[str, Any] | None = None,
        moment_bits: int = 32,
    ) -> None:
        projection = galore_group([], rank, update_gap, scale, projector, moment_policy, seed, projector_options)
        defaults = {**projection, "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        defaults.update(galore=False, moment_bits=moment_bits)  # groups are plain AdamW unless marked
        del defaults["params"]
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    # ---- stepping ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if group["galore"] and p.dim() == 2:
                    self._galore_step(p, group, index)
                else:
                    self._adamw_step(p, group)
        return loss

    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            _init_moments(state, torch.zeros_like(p, memory_format=torch.preserve_format), group["moment_bits"])
        exp_avg, exp_avg_sq = _load_moments(state)
        state["step"] += 1
        lr, weight_decay = group["lr"], group["weight_decay"]
        # torch.optim.AdamW's single-tensor arithmetic, operation for operation.
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        denom, bias_correction1 = _adam_moments_(exp_avg, exp_avg_sq, p.grad, group, float(state["step"]))
        p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
        _store_moments(state, exp_avg, exp_avg_sq)

    def _galore_step(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        state = self.state[p]
        grad = p.grad
        if "projector" not in state:
            state["projector"] = make_projector(
                group["projector"],
                group["rank"],
                group["update_gap"],
                seed=derive_seed(group["seed"], index),
                moment_policy=group["moment_policy"],
                **group["projector_options"],
            )
        projector: Projector = state["projector"]
        state.setdefault("step", 0)
        state.setdefault("moment_step", 0)
        changed = projector.refresh(grad, state["step"])
        if "exp_avg" not in state:
            low_shape = projector.low_rank_shape()
            _init_moments(state, torch.zeros(low_shape, dtype=grad.dtype, device=grad.device), group["moment_bits"])
            exp_avg, exp_avg_sq = _load_moments(state)
        else:
            exp_avg, exp_avg_sq = _load_moments(state)
            if changed:
                exp_avg, exp_avg_sq, restart = projector.transition_moments(exp_avg, exp_avg_sq)
                if restart:
                    state["moment_step"] = 0
        low = projector.down(grad)
        state["step"] += 1
        state["moment_step"] += 1
        lr, weight_decay = group["lr"], group["weight_decay"]
        denom, bias_correction1 = _adam_moments_(exp_avg, exp_avg_sq, low, group, float(state["moment_step"]))
        update = projector.up(exp_avg / denom)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)  # decoupled, full space, before the update (torch's order)
        p.add_(update.to(p.dtype), alpha=-(lr / bias_correction1) * group["scale"])
        _store_moments(state, exp_avg, exp_avg_sq)

    # ---- projector control -------------------------------------------------------------------------------
    def projectors(self) -> dict[int, Projector]:
        """The projector of each GaLore parameter that has one, keyed by parameter index (state_dict order)."""
        out = {}
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            projector = self.state.get(p, {}).get("projector")
            if projector is not None:
                out[index] = projector
        return out

    def set_projector(self, param: torch.Tensor, projector: Projector) -> None:
        """Install a given projector (e.g. a federated round's shared one) for ``param``.

        Moments already there are dropped when their shape does not fit the new basis, else left to the
        projector's policy at its next refresh. Use ``update_gap=0`` to keep the basis fixed.
        """
        if param.dim() != 2:
            raise ValueError("only 2-D parameters have projectors")
        if not any(param is p for group in self.param_groups if group["galore"] for p in group["params"]):
            raise ValueError("param is not in a galore=True group of this optimizer")
        state = self.state[param]
        state["projector"] = projector
        state.setdefault("step", 0)
        state.setdefault("moment_step", 0)
        if "exp_avg" in state and projector.basis is not None:
            exp_avg, _ = _load_moments(state)
            if tuple(exp_avg.shape) != projector.low_rank_shape():
                for key in [k for k in state if k.startswith("exp_avg")]:
                    del state[key]
                state["moment_step"] = 0

    def request_refresh(self) -> None:
        """Make every projector rebuild its basis at the next step, whatever its schedule."""
        for projector in self.projectors().values():
            projector.invalidate()

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict with each projector replaced by its ``state_dict()`` (no objects)."""
        packed = super().state_dict()
        packed["state"] = {
            key: {**value, "projector": value["projector"].state_dict()} if "projector" in value else dict(value)
            for key, value in packed["state"].items()
        }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's loader casts every tensor to the parameter's dtype and rebuilds iterables element-wise
        # (strings included), so projector states and integer (quantized) tensors are restored here instead.
        raw: dict[Any, dict[str, Any]] = {}
        safe: dict[Any, dict[str, Any]] = {}
        for key, value in state_dict["state"].items():
            raw[key] = {
                k: v
                for k, v in value.items()
                if k == "projector" or (isinstance(v, torch.Tensor) and not v.is_floating_point() and k != "step")
            }
            safe[key] = {k: v for k, v in value.items() if k not in raw[key]}
        super().load_state_dict({**state_dict, "state": safe})
        params = [p for group in self.param_groups for p in group["params"]]
        for key, entries in raw.items():
            p = params[int(key)]
            for name, value in entries.items():
                if name == "projector":
                    self.state[p][name] = projector_from_state(value, device=p.device)
                else:
                    self.state[p][name] = value.to(p.device)


def _adam_moments_(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], step: float
) -> tuple[torch.Tensor, float]:
    """Adam's moment updates in place (torch's order of operations); returns the step's denominator
    √(v / (1 − β₂ᵗ)) + ε and the first moment's bias correction 1 − β₁ᵗ."""
    beta1, beta2 = group["betas"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction2 = 1 - beta2**step
    return (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(group["eps"]), 1 - beta1**step


def _validate_group(group: dict[str, Any]) -> None:
    if group["lr"] < 0 or group["eps"] < 0 or group["weight_decay"] < 0:
        raise ValueError("lr, eps and weight_decay must be >= 0")
    beta1, beta2 = group["betas"]
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {group['betas']}")
    if group["moment_bits"] not in (8, 32):
        raise ValueError(f"moment_bits must be 32 or 8, got {group['moment_bits']!r}")
    if group["moment_bits"] == 8:
        _bitsandbytes_functional()  # fail at construction, not at the first step
    if not group["galore"]:
        return
    rank = group["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"galore groups need an integer rank >= 1, got {rank!r}")
    if not isinstance(group["update_gap"], int) or group["update_gap"] < 0:
        raise ValueError(f"update_gap must be an integer >= 0, got {group['update_gap']!r}")
    if group["projector"] not in PROJECTOR_KINDS:
        raise ValueError(f"unknown projector {group['projector']!r}; use one of {', '.join(PROJECTOR_KINDS)}")
    if group["moment_policy"] not in MOMENT_POLICIES:
        raise ValueError(f"unknown moment_policy {group['moment_policy']!r}; use one of {', '.join(MOMENT_POLICIES)}")
    if not math.isfinite(group["scale"]) or group["scale"] <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {group['scale']!r}")
    # Fail early on bad projector options (the projectors themselves are built lazily, per parameter).
    make_projector(
        group["projector"], rank, group["update_gap"], 0, group["moment_policy"], **group["projector_options"]
    )


# ---- moment storage: plain tensors, or bitsandbytes blockwise 8-bit -----------------------------------------
def _init_moments(state: dict[str, Any], zeros: torch.Tensor, bits: int) -> None:
    state["moment_bits"] = bits if zeros.numel() >= _QUANT_MIN_NUMEL else 32
    if state["moment_bits"] == 32:
        state["exp_avg"] = zeros
        state["exp_avg_sq"] = zeros.clone()
    else:
        state["moment_shape"] = list(zeros.shape)
        _store_moments(state, zeros, zeros.clone())


def _load_moments(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if state.get("moment_bits", 32) == 32:
        return state["exp_avg"], state["exp_avg_sq"]
    functional = _bitsandbytes_functional()
    shape = tuple(state["moment_shape"])
    out = []
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        code = _dynamic_map(functional, signed, state[key].device)
        values = functional.dequantize_blockwise(
            state[key], absmax=state[f"{key}_absmax"], code=code, blocksize=_QUANT_BLOCKSIZE
        )
        out.append(values.reshape(shape).float())
    return out[0], out[1]


def _store_moments(state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
    if state.get("moment_bits", 32) == 32:
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        return
    functional = _bitsandbytes_functional()
    for key, values, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
        code = _dynamic_map(functional, signed, values.device)
        quantized, quant_state = functional.quantize_blockwise(
            values.float().contiguous(), code=code, blocksize=_QUANT_BLOCKSIZE
        )
        state[key], state[f"{key}_absmax"] = quantized, quant_state.absmax


_DYNAMIC_MAPS: dict[tuple[bool, str], torch.Tensor] = {}


def _dynamic_map(functional: Any, signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[key] = functional.create_dynamic_map(signed=signed).to(device)
    return _DYNAMIC_MAPS[key]


# ---- parameter selection -----------------------------------------------------------------------------------
def module_matches(module_name: str, targets: Sequence[str]) -> bool:
    """peft's rule: a target matches the full module name or its dotted suffix; ``re:`` prefixes a regex."""
    for target in targets:
        if target.startswith("re:"):
            if re.fullmatch(target[3:], module_name):
                return True
        elif module_name == target or module_name.endswith("." + target):
            return True
    return False


def galore_group(params: Sequence[torch.nn.Parameter], rank: int, update_gap: int = 200, scale: float = 0.25,
                 projector: str = "svd", moment_policy: str = "keep", seed: int = 0,
                 projector_options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A GaLoreAdamW parameter group that projects ``params`` (the one way such a group is written)."""
    options = dict(projector_options or {})
    return dict(params=list(params), galore=True, rank=rank, update_gap=update_gap, scale=scale, projector=projector,
                moment_policy=moment_policy, seed=seed, projector_options=options)  # fmt: skip


def galore_param_groups(
    model: torch.nn.Module,
    target_modules: Sequence[str] | None = None,
    rank: int = 128,
    update_gap: int = 200,
    scale: float = 0.25,
    projector: str = "svd",
    moment_policy: str = "keep",
    *,
    include_head: bool = False,
    include_adapters: bool = False,
    seed: int = 0,
    lr: float | None = None,
    weight_decay: float | None = None,
    projector_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a GaLore group and a plain AdamW group.

    GaLore gets the trainable 2-D ``weight`` of: every ``nn.Linear`` outside the head and the adapters
    (``target_modules=None``), or the modules matching ``target_modules`` (peft-style names: "query",
    "attention.output.dense", or "re:<regex>"); the classifier head (``classifier``/``score``/``lm_head``)
    when ``include_head``; LoRA factors (``lora_A``/``lora_B``) when ``include_adapters``. Weights whose
    smaller side is <= ``rank`` stay in the plain group: projecting them saves nothing. Embeddings never
    go to GaLore. Frozen parameters are left out. Raises ValueError when nothing is selected.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    modules = dict(model.named_modules())
    selected: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        is_adapter = "lora_" in module_name
        is_head = module_name.split(".")[0] in HEAD_MODULES
        eligible = leaf == "weight" and param.dim() == 2 and not isinstance(module, torch.nn.Embedding)
        if is_adapter:
            wanted = include_adapters
        elif is_head:
            wanted = include_head
        elif target_modules is None:
            wanted = isinstance(module, torch.nn.Linear)
        else:
            wanted = module_matches(module_name, target_modules)
        if eligible and wanted and min(param.shape) > rank:
            selected.append(param)
        else:
            plain.append(param)
    if not selected:
        raise ValueError(
            f"no trainable 2-D weight matched target_modules={target_modules!r} with a smaller side > rank {rank}"
        )
    groups = [galore_group(selected, rank, update_gap, scale, projector, moment_policy, seed, projector_options)]
    if plain:
        groups.append({"params": plain})
    for group in groups:
        if lr is not None:
            group["lr"] = lr
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    return groups


# ---- memory accounting -------------------------------------------------------------------------------------
def _tensor_bytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def optimizer_state_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state by kind, for any torch optimizer.

    ``moments``: tensors in the per-parameter state (quantization scales included); ``projector_bases``: the
    materialised bases; ``projector_compact``: what the projectors' ``compact_state()`` would take to send;
    ``total`` = moments + projector_bases (what sits in memory). The ``step`` counters are not counted.
    """
    moments = bases = compact = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step":
                continue
            if isinstance(value, Projector):
                bases += value.basis_nbytes()
                compact += state_nbytes(value.compact_state())
            else:
                moments += _tensor_bytes(value)
    return {"moments": moments, "projector_bases": bases, "projector_compact": compact, "total": moments + bases}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held in memory: moments plus materialised projector bases."""
    return optimizer_state_breakdown(optimizer)["total"]


__all__ = [
    "GaLoreAdamW",
    "galore_group",
    "module_matches",
    "galore_param_groups",
    "optimizer_state_breakdown",
    "optimizer_state_bytes",
]
