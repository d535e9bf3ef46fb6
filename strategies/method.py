"""What an aggregation method is, and the decorator that registers one.

A method is one module under ``strategies/methods/`` (or any module named in ``method-modules``): its options,
its spec, its pure server math, and how user-level DP applies to it. ``strategies/methods/fedsvd.py`` is the
example to copy::

    @dataclass(frozen=True)
    class FedSVDOptions(MethodOptions):
        period: int = option(1, "re-factorize B̄·A every this many rounds (0: never)", minimum=0)


    @register_method("fedsvd", spec=MethodSpec(train=("B",), upload=("B",)), options=FedSVDOptions)
    def server_update(inputs: RoundInput, options: FedSVDOptions = FedSVDOptions()) -> ServerUpdate:
        ...

The options become config keys ``method.<name>.<key>`` (``fedlowrank keys`` lists them, the TOML defaults
include them, bad values are refused before a run starts); the spec travels to every client in its
instructions; ``server_update`` is a pure function of the round's input. Everything else (sampling, messages,
checks, the head, residuals, bias metrics, user-level DP, the run loop) is the same for every method.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

import torch

from fedlowrank.config import ConfigError, RunConfig, coerce_value
from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import client_weights, weighted_average
from fedlowrank.protocol import MethodSpec

__all__ = [
    "MethodDefinition",
    "MethodOptions",
    "MethodSpec",
    "RoundInput",
    "ServerUpdate",
    "UserDPMode",
    "client_weights",
    "derived",
    "option",
    "register_method",
    "weighted_average",
]


# ---- options ---------------------------------------------------------------------------------------------------
def option(
    default: Any,
    help: str,
    *,
    key: str | None = None,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
) -> Any:
    """A method option: config key ``method.<method>.<key>`` (default: the field name with dashes)."""
    return field(default=default, metadata={"help": help, "key": key, "choices": choices, "minimum": minimum})


def derived(default: Any) -> Any:
    """A field the options fill from the rest of the run config (``from_config``), not a config key."""
    return field(default=default, metadata={"derived": True})


@dataclass(frozen=True)
class OptionInfo:
    key: str
    attribute: str
    default: Any
    help: str


@dataclass(frozen=True)
class MethodOptions:
    """Base class of a method's options (a frozen dataclass of ``option(...)`` fields)."""

    @classmethod
    def option_info(cls) -> list[OptionInfo]:
        return [
            OptionInfo(f.metadata.get("key") or f.name.replace("_", "-"), f.name, f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(cls)
            if not f.metadata.get("derived")
        ]

    @classmethod
    def from_config(cls: type[OptionsT], raw: Mapping[str, Any], config: RunConfig, method: str) -> OptionsT:
        """The options of ``method`` from its ``method.<method>.*`` keys; clear errors for unknown keys and bad
        values. Override to fill ``derived`` fields from ``config`` (call this first)."""
        infos = {info.key: info for info in cls.option_info()}
        hints = get_type_hints(cls)
        values = {}
        for key, value in raw.items():
            full_key = f"method.{method}.{key}"
            if key not in infos:
                close = difflib.get_close_matches(key, list(infos), n=2)
                hint = f" Did you mean {', '.join(f'method.{method}.{c}' for c in close)}?" if close else ""
                known = ", ".join(f"method.{method}.{k}" for k in infos) or "none"
                raise ConfigError(f"unknown config key {full_key!r}.{hint} Options of {method!r}: {known}")
            values[infos[key].attribute] = coerce_value(full_key, value, hints[infos[key].attribute])
        options = cls(**values)
        options.validate(method)
        return options

    def validate(self, method: str) -> None:
        """Check each option's declared choices and minimum; override for more (call this too)."""
        for info, spec in zip(self.option_info(), self._option_fields(), strict=True):
            value = getattr(self, info.attribute)
            choices, minimum = spec.metadata.get("choices"), spec.metadata.get("minimum")
            if choices is not None and value not in choices:
                allowed = ", ".join(repr(c) for c in choices)
                raise ConfigError(f"method.{method}.{info.key} must be one of {allowed}, got {value!r}")
            if minimum is not None and not value >= minimum:
                raise ConfigError(f"method.{method}.{info.key} must be >= {minimum:g}, got {value!r}")

    @classmethod
    def _option_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]

    def check_run(self, config: RunConfig) -> None:
        """Constraints this method puts on the rest of the run config (raise ``ConfigError``)."""

    def check_adapter(self, initial_state: dict[str, torch.Tensor]) -> None:
        """Constraints this method puts on the model's adapter (its layers and shapes), before any round."""

    def extra_uploads(self, initial_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """What clients upload beyond adapter tensors (key -> shape): the server rejects other uploads."""
        return {}

    def adjust_spec(self, spec: MethodSpec) -> MethodSpec:
        """The spec under these options (e.g. FedSA's local head)."""
        return spec

    def as_config(self) -> dict[str, Any]:
        return {info.key: getattr(self, info.attribute) for info in self.option_info()}


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without options."""


NO_OPTIONS = NoOptions()


# ---- one round's math ------------------------------------------------------------------------------------------
@dataclass
class RoundInput:
    clients: list[dict[str, LayerFactors]]  # each client's factors (what it did not upload: the previous global)
    weights: torch.Tensor  # p_k, float64, sums to one
    previous: dict[str, LayerFactors]  # the global factors the clients started from
    server_round: int
    # M* = Σ p_k B_k A_k per layer when it cannot be formed from ``clients`` (user-level DP releases a
    # noisy M* alongside the noisy mean factors); None: computed from the clients.
    target_products: dict[str, torch.Tensor] | None = None
    uploads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # as sent (head, projected updates, ...)
    seed: int = 0  # the run seed: randomness every peer can re-derive (FLoRA's fresh A, a round's basis)
    scale: float = 1.0  # s = α/r (α/√r with rsLoRA): a layer's weight is W0 + s·B·A
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # what this method kept from its last round


@dataclass
class ServerUpdate:
    factors: dict[str, LayerFactors]  # the new global factors
    # ΔW to add to each layer's frozen weight this round (d_out x d_in, weight units): FedEx's residual s(M* − B̄Ā),
    # FLoRA's merge s·M*, federated GaLore's averaged update.
    fold: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # method-specific figures for metrics.jsonl
    # The method's server state for the next round (momentum buffers, ...); None: keep the current state. It is
    # checkpointed with the run, so a stateful method stays a pure function: state in, state out.
    state: dict[str, torch.Tensor] | None = None


# ---- the definition and its registration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class UserDPMode:
    """How user-level DP (DP-FedAvg on the server) applies to a method: each client's update (what it uploads
    minus what it was sent) is clipped and the noisy mean replaces the clients in the method's math, which is
    then post-processing. ``with_products``: also release a noisy M* (math that needs Σ p_k B_k A_k)."""

    with_products: bool = False


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    spec: MethodSpec
    server_update: Callable[[RoundInput, Any], ServerUpdate]
    options: type[MethodOptions] = NoOptions
    aliases: tuple[str, ...] = ()
    user_dp: UserDPMode | None = UserDPMode()  # None: user-level DP does not apply to this method
    summary: str = ""
    default: bool = False  # the method an empty ``strategy`` means


F = TypeVar("F", bound=Callable[..., ServerUpdate])


def register_method(
    name: str,
    *,
    spec: MethodSpec,
    options: type[MethodOptions] = NoOptions,
    aliases: Sequence[str] = (),
    user_dp: UserDPMode | None = UserDPMode(),
    default: bool = False,
) -> Callable[[F], F]:
    """Register the decorated ``server_update(inputs, options)`` as method ``name`` (``strategy = name``)."""

    def register(server_update: F) -> F:
        from strategies.registry import add_method

        summary = _module_summary(server_update) or name
        add_method(MethodDefinition(name, spec, server_update, options, tuple(aliases), user_dp, summary, default))
        return server_update

    return register


def _module_summary(function: Callable) -> str:
    import sys

    module = sys.modules.get(function.__module__)
    doc = (module.__doc__ if module is not None else None) or function.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
