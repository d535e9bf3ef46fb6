"""Strategy names accepted by ``strategy = ...`` and the factory that builds each one."""

from __future__ import annotations

from collections.abc import Callable

from fedlowrank.config import ConfigError, RunConfig
from strategies import fedit
from strategies.base import LoRAStrategy


def _fedit(config: RunConfig) -> LoRAStrategy:
    return LoRAStrategy(fedit.aggregate, weighting=config.weighting, **sampling_kwargs(config))


STRATEGIES: dict[str, Callable[[RunConfig], LoRAStrategy]] = {
    "fedit": _fedit,
}
ALIASES = {"fedavg": "fedit", "fedavg-lora": "fedit"}


def sampling_kwargs(config: RunConfig) -> dict:
    """FedAvg's sampling: fractions of the connected nodes, never fewer than one (or all, if fewer)."""
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
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES) + sorted(ALIASES))}")
    return name


def build_strategy(config: RunConfig) -> LoRAStrategy:
    return STRATEGIES[canonical_name(config.strategy)](config)
