"""The method registry: every module under ``strategies/methods/`` registers itself (``register_method``), and
``method-modules`` names more. Everything that lists or checks methods asks here: ``strategy = ...``, the
CLI's strategy lists, ``fedlowrank keys``, the TOML defaults and the method-specific config checks.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.galore_setup import check_galore_on_lora_factors
from fedlowrank.protocol import PROJECTED_FULL_WEIGHTS_TRAINER, MethodSpec
from strategies.method import MethodDefinition, MethodOptions, RoundInput, ServerUpdate

_METHODS: dict[str, MethodDefinition] = {}
_ALIASES: dict[str, str] = {}
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
_loaded_builtins = False


def add_method(definition: MethodDefinition) -> None:
    """Register a method (``register_method`` calls this). A name or alias taken by another module is refused."""
    if not _NAME.match(definition.name):
        raise ValueError(f"method name {definition.name!r}: use lowercase letters, digits and dashes")
    existing = _METHODS.get(definition.name)
    if definition.default and any(m.default for m in _METHODS.values() if m.name != definition.name):
        raise ValueError(f"method {definition.name!r} cannot be the default: another one is")
    if existing is not None and existing.server_update.__module__ != definition.server_update.__module__:
        raise ValueError(
            f"method {definition.name!r} is registered twice ({existing.server_update.__module__} and "
            f"{definition.server_update.__module__})"
        )
    for alias in definition.aliases:
        owner = _ALIASES.get(alias, definition.name)
        if owner != definition.name or alias in _METHODS:
            raise ValueError(f"alias {alias!r} of method {definition.name!r} is already taken by {owner!r}")
    _METHODS[definition.name] = definition
    _ALIASES.update({alias: definition.name for alias in definition.aliases})


def _load_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    import strategies.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded_builtins = True


def load_method_modules(modules: Iterable[str]) -> None:
    """Import modules that register methods: import names (``my_lab.methods.fedavgm``) or ``.py`` paths."""
    for module in modules:
        if module.endswith(".py"):
            path = Path(module).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"method-modules: file not found: {module}")
            name = f"fedlowrank_method_{path.stem}_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            loaded = sys.modules.get(name) or importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)  # type: ignore[union-attr]  (registering again is harmless)
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"method-modules: cannot import {module!r}: {exc}") from exc


def method_names() -> list[str]:
    """Every registered method, in registration order (the built-in ones first)."""
    _load_builtins()
    return list(_METHODS)


def default_method() -> MethodDefinition:
    """The method registered with ``default=True`` (what an empty ``strategy`` means)."""
    _load_builtins()
    return next(m for m in _METHODS.values() if m.default)


def get_method(name: str) -> MethodDefinition:
    """A method by name or alias (any case; empty: the default one); unknown names are refused with the close
    ones."""
    if not name:
        return default_method()
    _load_builtins()
    key = name.lower()
    canonical = _ALIASES.get(key, key)
    if canonical in _METHODS:
        return _METHODS[canonical]
    known = list(_METHODS) + list(_ALIASES)
    close = difflib.get_close_matches(key, known, n=2)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown strategy {name!r}.{hint} Available: {', '.join(known)} (your own: list its module in method-modules)"
    )


@dataclass(frozen=True)
class ResolvedMethod:
    """The run's method: its definition, its checked options, and its spec under those options."""

    definition: MethodDefinition
    options: MethodOptions
    spec: MethodSpec

    @property
    def name(self) -> str:
        return self.definition.name

    def server_update(self, inputs: RoundInput) -> ServerUpdate:
        return self.definition.server_update(inputs, self.options)


def resolve_method(config: RunConfig) -> ResolvedMethod:
    """Check everything method-related in ``config`` and return the run's method.

    Every registered method's ``method.*`` options are parsed (a typo in any of them is refused) and written
    back into ``config.method`` with their defaults, so the run's ``config.toml`` records all of them.
    """
    load_method_modules(config.method_modules)
    definition = get_method(config.strategy)
    config.strategy = definition.name  # the run records the method's own name
    for section in config.method:
        if section not in _METHODS:
            close = difflib.get_close_matches(section, list(_METHODS), n=2)
            hint = f" Did you mean method.{close[0]}?" if close else ""
            raise ConfigError(f"method.{section}.* names no method.{hint} Methods: {', '.join(_METHODS)}")
    options = {
        name: method.options.from_config(config.method.get(name, {}), config, name) for name, method in _METHODS.items()
    }
    config.method = {name: values.as_config() for name, values in options.items()}
    chosen = options[definition.name]
    spec = chosen.adjust_spec(definition.spec)
    spec = replace(spec, local_head=spec.local_head and spec.local_b and config.lora.train_head)
    _check_run(config, definition, spec)
    chosen.check_run(config)
    return ResolvedMethod(definition, chosen, spec)


def _check_run(config: RunConfig, definition: MethodDefinition, spec: MethodSpec) -> None:
    """The config rules that depend on what a method is (its spec), whatever method it is."""
    name = definition.name
    if config.lora.client_ranks and not spec.heterogeneous_ranks:
        able = [m.name for m in _METHODS.values() if m.spec.heterogeneous_ranks]
        raise ConfigError(
            f"lora.client-ranks (heterogeneous ranks) is supported by strategy = {' or '.join(map(repr, able))}, "
            f"not {name!r}"
        )
    if config.dp.user_level and definition.user_dp is None:
        able = [m.name for m in _METHODS.values() if m.user_dp is not None]
        raise ConfigError(f"user-level DP is available for {', '.join(able)}, not {name!r}")
    trains_base = spec.trainer == PROJECTED_FULL_WEIGHTS_TRAINER
    if config.galore.train_modules and not trains_base:
        able = [m.name for m in _METHODS.values() if m.spec.trainer == PROJECTED_FULL_WEIGHTS_TRAINER]
        raise ConfigError(
            f"galore.train-modules trains full base weights, which strategy {name!r} does not aggregate "
            f"(it sends LoRA adapters only): use {' or '.join(map(repr, able)) or 'a full-weight method'}, "
            "or centralized training"
        )
    if not trains_base:
        check_galore_on_lora_factors(config)


def option_defaults() -> dict[str, dict[str, Any]]:
    """``{method: {option: default}}`` of every registered method (the TOML defaults)."""
    _load_builtins()
    return {name: {i.key: i.default for i in m.options.option_info()} for name, m in _METHODS.items()}


def option_help() -> dict[str, tuple[Any, str]]:
    """``{"method.<method>.<option>": (default, help)}`` for ``fedlowrank keys``."""
    _load_builtins()
    return {
        f"method.{name}.{info.key}": (info.default, info.help)
        for name, method in _METHODS.items()
        for info in method.options.option_info()
    }
