"""Strategy names accepted by ``strategy = ...``: each is a ``MethodSpec`` plus its server math."""

from __future__ import annotations

from functools import partial

import torch

from fedlowrank.adapters import lora_scale
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.galore_setup import fed_galore_modules
from fedlowrank.privacy.user_level import UserLevelLedger
from strategies import fed_galore, fedex, fedit, fedsa, fedsvd, ffa, flexlora, flora, lora_fair
from strategies.base import LoRAStrategy
from strategies.common import MethodSpec, ServerMath
from strategies.user_dp import FLOWER_WRAPPED, OWN_MECHANISM, FlowerUserDP, UserDP


def _methods(config: RunConfig) -> dict[str, tuple[MethodSpec, ServerMath]]:
    options = config.method
    return {
        "fedit": (fedit.SPEC, fedit.server_update),
        "fedsa": (fedsa.SPEC, fedsa.server_update),
        "ffa": (ffa.SPEC, ffa.server_update),
        "fedsvd": (fedsvd.SPEC, partial(fedsvd.server_update, period=options.fedsvd_period)),
        "lora-fair": (
            lora_fair.SPEC,
            partial(
                lora_fair.server_update,
                solver=options.fair_solver,
                lam=options.fair_lambda,
                iterations=options.fair_iterations,
                lr=options.fair_lr,
            ),
        ),
        "fedex": (fedex.SPEC, fedex.server_update),
        "flora": (flora.SPEC, partial(flora.server_update, seed=config.seed)),
        "flexlora": (flexlora.SPEC, flexlora.server_update),
        # Not factor math: FedGaLoreStrategy aggregates projected full-weight updates itself.
        "fed-galore": (fed_galore.SPEC, fed_galore._no_factor_math),
    }


STRATEGY_NAMES = ("fedit", "fedsa", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora", "fed-galore")
ALIASES = {
    "fedavg": "fedit",
    "fedavg-lora": "fedit",
    "fedsa-lora": "fedsa",
    "ffa-lora": "ffa",
    "fair": "lora-fair",
    "lorafair": "lora-fair",
    "fedex-lora": "fedex",
    "fedgalore": "fed-galore",
}


def sampling_kwargs(config: RunConfig) -> dict:
    """FedAvg's sampling: fractions of the connected nodes, never fewer than one."""
    train_nodes = max(1, int(config.num_clients * config.fraction_train))
    eval_nodes = max(1, int(config.num_clients * config.fraction_evaluate)) if config.fraction_evaluate else 0
    return {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": train_nodes,
        "min_evaluate_nodes": eval_nodes,
        "min_available_nodes": config.num_clients,
    }


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in STRATEGY_NAMES:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(STRATEGY_NAMES + tuple(ALIASES))}")
    return name


def method_spec(config: RunConfig) -> MethodSpec:
    return _methods(config)[canonical_name(config.strategy)][0]


def _fed_galore(config: RunConfig, initial_state: dict[str, torch.Tensor]) -> LoRAStrategy:
    if config.dp.user_level:
        raise ConfigError("user-level DP is not available for strategy 'fed-galore'")
    modules = fed_galore_modules(config.galore, config.lora.target_modules)
    return fed_galore.FedGaLoreStrategy(
        initial_state,
        fed_galore.layer_shapes(initial_state, modules),
        rank=config.galore.rank,
        seed=config.seed,
        weighting=config.weighting,
        **sampling_kwargs(config),
    )


def build_strategy(config: RunConfig, initial_state: dict[str, torch.Tensor]) -> LoRAStrategy:
    """The method's ``LoRAStrategy``; with user-level DP, wrapped by Flower's DP wrapper or given the
    equivalent mechanism (strategies/user_dp.py)."""
    name = canonical_name(config.strategy)
    spec, server_math = _methods(config)[name]
    if name == "fed-galore":
        return _fed_galore(config, initial_state)
    if config.galore.train_modules:
        raise ConfigError(
            f"galore.train-modules trains full base weights, which strategy {name!r} does not aggregate "
            "(it sends LoRA adapters only): use strategy = 'fed-galore', or centralized training"
        )
    dp = config.dp
    own_mechanism = None
    if dp.user_level:
        if name not in FLOWER_WRAPPED + OWN_MECHANISM:
            raise ConfigError(
                f"user-level DP is available for {', '.join(FLOWER_WRAPPED + OWN_MECHANISM)}, not {name!r}"
            )
        # No amplification from client sampling is claimed: FedAvg's sampling is neither secret nor Poisson.
        ledger = UserLevelLedger(dp.user_noise_multiplier, 1.0, dp.user_delta, dp.accountant)
        if name in OWN_MECHANISM:
            own_mechanism = UserDP(
                dp.user_noise_multiplier,
                dp.user_clip_norm,
                ledger,
                with_products=name == "lora-fair",
                generator=torch.Generator().manual_seed(config.seed),
            )
    strategy = LoRAStrategy(
        spec,
        server_math,
        initial_state=initial_state,
        scale=lora_scale(config.lora),
        weighting=config.weighting,
        local_head=config.method.fedsa_local_head and config.lora.train_head,
        user_dp=own_mechanism,
        **sampling_kwargs(config),
    )
    if dp.user_level and own_mechanism is None:
        sampled = sampling_kwargs(config)["min_train_nodes"]
        return FlowerUserDP(strategy, dp.user_noise_multiplier, dp.user_clip_norm, sampled, ledger)
    return strategy
