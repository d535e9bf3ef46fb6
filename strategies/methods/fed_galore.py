"""Federated GaLore: clients train full base weights on a basis shared for the round; only r x n goes up.

Per trained weight W (the base weight under a LoRA layer; the LoRA factors stay frozen with B = 0) and
round t, the basis P_t is Gaussian from ``derive_seed(seed, t, layer)``: the server sends the seed, not a
basis. Client k trains W with GaLoreAdamW on P_t (``update_gap = 0``, no weight decay, so every step is
``up(·)`` and ΔW_k stays in span(P_t)) and uploads ``down(ΔW_k)``. The server averages the uploads with the
clients' weights and folds ``up(avg)`` into W, which equals W + Σ_k p_k ΔW_k.

The learned W − W0 is what the strategy folds into the frozen weights, like FedEx's and FLoRA's residuals:
the broadcast, the server's evaluation and the saved ``base_residuals.safetensors`` are theirs. Downlink is
honest and dense: from round 2 on every client receives each trained W − W0 in full (m x n, fp32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedlowrank.adapters import lora_targets
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.factors import lora_factors
from fedlowrank.fed_galore import projected_average, projected_upload_bytes, round_projectors
from fedlowrank.galore import module_matches
from fedlowrank.galore_setup import check_fed_galore_rank, fed_galore_modules
from fedlowrank.projectors import Projector
from fedlowrank.protocol import PROJECTED_FULL_WEIGHTS_TRAINER, PROJECTED_SUFFIX
from strategies.method import MethodOptions, MethodSpec, RoundInput, ServerUpdate, derived, register_method

# No LoRA factor trains or travels: the base weights do (as projected updates up, folded residuals down).
SPEC = MethodSpec(trainer=PROJECTED_FULL_WEIGHTS_TRAINER, train=(), upload=(), download=())


@dataclass(frozen=True)
class FedGaLoreOptions(MethodOptions):
    """No keys of its own: ``[galore]`` sets the rank, and ``galore.train-modules`` the weights (empty: every
    LoRA target)."""

    rank: int = derived(4)
    modules: tuple[str, ...] = derived(())

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], config: RunConfig, method: str) -> FedGaLoreOptions:
        options = super().from_config(raw, config, method)
        targets = lora_targets(config.model, config.task, config.lora.target_modules, config.trust_remote_code)
        modules = tuple(fed_galore_modules(config.galore, targets))
        return replace(options, rank=config.galore.rank, modules=modules)

    def check_run(self, config: RunConfig) -> None:
        if config.optimizer not in ("adamw", "galore"):
            raise ConfigError(
                f"strategy 'fed-galore' trains with GaLoreAdamW: set optimizer = 'galore' (or 'adamw'), "
                f"not {config.optimizer!r}"
            )
        if config.galore.projector != "gaussian":
            raise ConfigError(
                "strategy 'fed-galore' supports galore.projector = 'gaussian' (the round's basis from a seed); "
                "an SVD of the previous aggregate would never leave the first round's span"
            )
        if config.train.weight_decay != 0:
            raise ConfigError(
                "strategy 'fed-galore' needs train.weight-decay = 0: full-space decay moves weights out of the "
                "round's shared span, so the server could not rebuild the clients' updates exactly"
            )
        if config.dp.sample_level:
            raise ConfigError("DP-SGD (dp.epsilon > 0) does not support GaLore yet")

    def check_adapter(self, initial_state: dict[str, torch.Tensor]) -> None:
        check_fed_galore_rank(layer_shapes(initial_state, self.modules), self.rank)

    def extra_uploads(self, initial_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Each trained weight's projected update, down(ΔW): r x n or m x r (the round's basis has that shape)."""
        projectors = server_projectors(layer_shapes(initial_state, self.modules), self.rank, seed=0, server_round=1)
        return {f"{layer}{PROJECTED_SUFFIX}": tuple(p.low_rank_shape()) for layer, p in projectors.items()}


def layer_shapes(initial_state: Mapping[str, torch.Tensor], modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{layer: (d_out, d_in)}`` of the LoRA layers matching ``modules``, read off the factor shapes."""
    factors = lora_factors(dict(initial_state))
    return {
        layer: (int(pair.B.shape[0]), int(pair.A.shape[1]))
        for layer, pair in factors.items()
        if module_matches(layer, modules)
    }


def server_projectors(
    shapes: Mapping[str, tuple[int, int]], rank: int, seed: int, server_round: int
) -> dict[str, Projector]:
    """The round's Gaussian projectors, the ones every client rebuilds from (seed, round, layer)."""
    zeros = {layer: torch.zeros(shape, dtype=torch.float32) for layer, shape in shapes.items()}
    return round_projectors(zeros, "gaussian", rank, seed, server_round)


@register_method("fed-galore", spec=SPEC, options=FedGaLoreOptions, aliases=("fedgalore",), user_dp=None)
def server_update(inputs: RoundInput, options: FedGaLoreOptions = FedGaLoreOptions()) -> ServerUpdate:
    """Fold up(Σ_k p_k down(ΔW_k)) into each trained weight, in float64; the LoRA factors stay as they are."""
    shapes = {
        layer: (int(pair.B.shape[0]), int(pair.A.shape[1]))
        for layer, pair in inputs.previous.items()
        if module_matches(layer, options.modules)
    }
    projectors = server_projectors(shapes, options.rank, inputs.seed, inputs.server_round)
    uploads = [
        {key[: -len(PROJECTED_SUFFIX)]: value for key, value in upload.items() if key.endswith(PROJECTED_SUFFIX)}
        for upload in inputs.uploads
    ]
    if any(set(upload) != set(projectors) for upload in uploads):
        raise ValueError("a fed-galore client uploaded projected updates for other layers than the server's")
    fold = projected_average(uploads, inputs.weights.tolist(), projectors)
    projected, dense = projected_upload_bytes(projectors)
    metrics = {"galore_projected_bytes": projected, "galore_dense_bytes": dense}
    return ServerUpdate(factors=dict(inputs.previous), fold=fold, metrics=metrics)
