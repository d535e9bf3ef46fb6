"""GaLore from the run configuration: which weights it projects, unfreezing base weights, fed-galore clients.

``optimizer = "galore"`` gives the trainable 2-D weights selected by ``[galore]`` a GaLoreAdamW group;
everything else trainable (the head, 1-D tensors, weights too thin to project) gets plain AdamW in the
same optimizer. ``galore.train-modules`` unfreezes the base weights under LoRA layers so they train in full.

The ``fed-galore`` client (:func:`fed_galore_client_train`) trains those base weights with GaLoreAdamW on
the round's shared Gaussian basis (``update_gap = 0``: fixed for the round) and returns the projected
updates ``down(W_after − W_before)`` it uploads. Flower-free, so it is tested without a federation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedlowrank.config import ConfigError, GaLoreSettings, TrainSettings
from fedlowrank.fed_galore import client_projected_updates, projectors_from_wire, projectors_to_wire, round_projectors
from fedlowrank.galore import GaLoreAdamW, galore_group, module_matches

if TYPE_CHECKING:  # fedlowrank.data needs datasets, which a bare GPU machine lacks
    from fedlowrank.data import Loader

# Keys of fed-galore uploads: "<layer>.projected" holds down(ΔW) (r x n or m x r).
PROJECTED_SUFFIX = ".projected"
_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")


def owner_layer(param_name: str) -> str:
    """The layer a parameter belongs to: ``...query.lora_A.default.weight`` and
    ``...query.base_layer.weight`` -> ``...query``; ``...classifier.modules_to_save.default.weight`` ->
    ``...classifier``; otherwise the parameter's module."""
    for marker in (*_ADAPTER_MARKERS, ".base_layer.", ".modules_to_save."):
        if marker in param_name:
            return param_name.split(marker)[0]
    return param_name.rpartition(".")[0]


def lora_base_weights(model: torch.nn.Module, modules: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """``{layer: base weight}`` of the LoRA-wrapped layers matching ``modules`` (sorted by layer name)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "lora_A") and module_matches(name, modules):
            if getattr(module, "fan_in_fan_out", False):
                raise ConfigError(f"{name}: GaLore on transposed (Conv1D / fan_in_fan_out) weights is not supported")
            out[name] = module.base_layer.weight
    if modules and not out:
        raise ConfigError(f"galore.train-modules {list(modules)} match no LoRA-wrapped layer of this model")
    return dict(sorted(out.items()))


def set_base_trainable(model: torch.nn.Module, modules: Sequence[str], trainable: bool = True) -> list[str]:
    """(Un)freeze the base weights under the LoRA layers matching ``modules``; returns the layers touched."""
    weights = lora_base_weights(model, modules) if modules else {}
    for weight in weights.values():
        weight.requires_grad_(trainable)
    return list(weights)


def galore_groups(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    galore: GaLoreSettings,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """GaLoreAdamW param groups over ``params`` (the trainable ones) as ``[galore]`` selects them.

    Raises ConfigError when no selected weight has a smaller side above ``galore.rank``.
    """
    wanted_ids = {id(p) for p in params}
    modules = dict(model.named_modules())
    selected: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    too_thin: dict[str, int] = {}
    for name, param in model.named_parameters():
        if id(param) not in wanted_ids:
            continue
        wanted_ids.discard(id(param))  # tied parameters appear once
        layer = owner_layer(name)
        module = modules.get(name.rpartition(".")[0])
        is_head = ".modules_to_save." in name
        eligible = param.dim() == 2 and name.endswith("weight") and not isinstance(module, torch.nn.Embedding)
        if is_head:
            wanted = galore.include_head
        elif galore.target_modules:
            wanted = module_matches(layer, galore.target_modules)
        else:
            wanted = True
        if eligible and wanted and min(param.shape) > galore.rank:
            selected.append(param)
        else:
            if eligible and wanted:
                too_thin[name] = min(param.shape)
            plain.append(param)
    if not selected:
        sides = sorted(set(too_thin.values()))
        detail = (
            f"the selected 2-D weights have smaller sides {sides} (LoRA factors: lora.r)"
            if sides
            else f"no trainable 2-D weight matches galore.target-modules={galore.target_modules}"
        )
        raise ConfigError(
            f"GaLore has nothing to project with galore.rank={galore.rank}: {detail}. A weight is projected only "
            "when its smaller side exceeds the rank; lower galore.rank, change galore.target-modules, or "
            "unfreeze base weights with galore.train-modules"
        )
    group = galore_group(
        selected, galore.rank, galore.update_gap, galore.scale, galore.projector, galore.moment_policy, seed
    )
    if galore.lr > 0:
        group["lr"] = galore.lr
    return [group, {"params": plain}] if plain else [group]


def make_galore_optimizer(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    settings: TrainSettings,
    galore: GaLoreSettings,
    seed: int = 0,
) -> GaLoreAdamW:
    """GaLoreAdamW for ``params`` with the learning rate and weight decay of ``settings``."""
    groups = galore_groups(model, params, galore, seed)
    return GaLoreAdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def check_galore_on_lora_factors(config: Any) -> None:
    """``optimizer = "galore"`` with no base weights unfrozen: the LoRA factors (r x d) are the only 2-D weights,
    so their smaller side, lora.r, must exceed galore.rank (checked before a run, not at its first step)."""
    galore = config.galore
    if config.optimizer != "galore" or galore.train_modules:
        return
    if config.lora.adapter != "lora":
        raise ConfigError(
            "optimizer = 'galore' needs 2-D trainable weights: VeRA trains only vectors; "
            "set galore.train-modules or lora.adapter = 'lora'"
        )
    if galore.rank >= config.lora.r:
        raise ConfigError(
            f"galore.rank={galore.rank} is not below lora.r={config.lora.r}: the only 2-D trainable weights are "
            f"the LoRA factors, whose smaller side is lora.r, so projecting them saves nothing. Use "
            f"galore.rank < {config.lora.r}, or unfreeze base weights with galore.train-modules"
        )


# ---- fed-galore: the client's round ---------------------------------------------------------------------
def fed_galore_modules(galore: GaLoreSettings, lora_targets: Sequence[str]) -> list[str]:
    """The modules whose base weights fed-galore trains: galore.train-modules, else all LoRA targets."""
    return list(galore.train_modules or lora_targets)


def check_fed_galore_rank(shapes: dict[str, tuple[int, int]], rank: int) -> None:
    """fed-galore's rank must be below every trained weight's smaller side (else nothing is compressed)."""
    thin = {layer: min(shape) for layer, shape in shapes.items() if min(shape) <= rank}
    if thin:
        raise ConfigError(
            f"galore.rank={rank} is not below the smaller side of {len(thin)} trained weight(s) "
            f"(smallest: {min(thin.values())}): the projected upload would be no smaller than the weight. "
            f"Use galore.rank < {min(thin.values())}"
        )


def fed_galore_client_train(
    model: torch.nn.Module,
    loader: Loader,
    settings: TrainSettings,
    galore: GaLoreSettings,
    modules: Sequence[str],
    basis_seed: int,
    server_round: int,
    seed: int = 0,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """One fed-galore round on this client: (TrainResult, ``{layer: down(W_after − W_before)}``).

    The base weights under the LoRA layers matching ``modules`` train with GaLoreAdamW on the round's
    Gaussian basis, derived from (``basis_seed``, ``server_round``, layer name) exactly as the server
    derives it; everything else that requires grad (the head) gets plain AdamW. LoRA factors are frozen by
    the caller. The base weights are frozen again on return.
    """
    from fedlowrank.training import train_local  # training imports this module

    if settings.weight_decay != 0:
        raise ConfigError("fed-galore needs train.weight-decay = 0 (decay leaves the round's span)")
    weights = lora_base_weights(model, modules)
    before = {layer: w.detach().to("cpu", torch.float32).clone() for layer, w in weights.items()}
    check_fed_galore_rank({layer: tuple(w.shape) for layer, w in before.items()}, galore.rank)
    # Rebuild from the compact state, as a remote client would from (seed, round, name) alone.
    wire = projectors_to_wire(round_projectors(before, "gaussian", galore.rank, basis_seed, server_round))
    device = next(iter(weights.values())).device
    projectors = projectors_from_wire(wire, device)
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        base_ids = {id(w) for w in weights.values()}
        # update_gap 0: the round's basis, never refreshed locally, so every step stays in its span
        group = galore_group(list(weights.values()), galore.rank, 0, galore.scale, "gaussian")
        if galore.lr > 0:
            group["lr"] = galore.lr
        groups = [group]
        others = [p for p in trainable if id(p) not in base_ids]
        if others:
            groups.append({"params": others})
        optimizer = GaLoreAdamW(groups, lr=settings.lr, weight_decay=0.0)
        for layer, weight in weights.items():
            optimizer.set_projector(weight, projectors[layer])
        result = train_local(model, loader, settings, seed=seed, optimizer=optimizer)
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
    after = {layer: w.detach().to("cpu", torch.float32).clone() for layer, w in weights.items()}
    with torch.no_grad():  # the shared model goes back to the global weights: the next client starts there
        for layer, weight in weights.items():
            weight.copy_(before[layer])
    cpu_projectors = projectors_from_wire(wire)
    return result, client_projected_updates(cpu_projectors, before, after)


__all__ = [
    "PROJECTED_SUFFIX",
    "check_fed_galore_rank",
    "check_galore_on_lora_factors",
    "fed_galore_client_train",
    "fed_galore_modules",
    "galore_groups",
    "lora_base_weights",
    "make_galore_optimizer",
    "owner_layer",
    "set_base_trainable",
]
