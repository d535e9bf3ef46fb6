"""peft LoRA adapters: attach, read/write adapter state as ``{name: tensor}``, pair factors, freeze, count.

Adapter state keys are peft's own (``get_peft_model_state_dict``) so that a state dict written here loads
with ``set_peft_model_state_dict`` and a saved adapter with ``PeftModel.from_pretrained``:
``...query.lora_A.weight``, ``...query.lora_B.weight`` and, for a trained head, ``classifier.weight``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, VeraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from fedlowrank.config import LoraSettings
from fedlowrank.errors import AdapterConfigError  # noqa: F401  (raised here; defined light for the CLI)
from fedlowrank.factors import (  # noqa: F401  (re-exported: the adapter-state vocabulary)
    A_SIDE,
    B_SIDE,
    FROZEN_SHARED,
    LORA_A,
    LORA_B,
    RESIDUAL_SUFFIX,
    LayerFactors,
    client_rank,
    factor_keys,
    factor_state,
    key_role,
    layer_name,
    lora_factors,
    select_roles,
    slice_rank,
    split_residuals,
)

# Output heads of the task models we support (sequence and image classification: "classifier", e.g. BERT,
# RoBERTa, ViT; "score": classification heads on causal LMs).
HEAD_MODULE_NAMES = ("classifier", "score")
# Tasks with a classification head, trained and saved through peft's modules_to_save.
CLASSIFICATION_TASKS = ("seq-cls", "image-cls")
# peft task types: SEQ_CLS adds the head to modules_to_save itself; image classification has no task type
# (a plain PeftModel), so its head is listed explicitly.
PEFT_TASK_TYPES = {"seq-cls": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM, "image-cls": None}


def family_targets(model_type: str, task: str, targets: list[str]) -> list[str]:
    """``targets``, or a decoder family's attention projections where a causal LM keeps the encoder default
    (query, value): peft's table (Llama, Qwen2, Mistral: q_proj, v_proj; GPT-2: c_attn; GPT-NeoX:
    query_key_value). Set lora.target-modules to choose others, e.g. the MLP projections too."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as FAMILY_TARGETS

    if task != "causal-lm" or list(targets) != LoraSettings().target_modules or model_type not in FAMILY_TARGETS:
        return list(targets)
    return list(FAMILY_TARGETS[model_type])


def resolve_targets(model: PreTrainedModel, settings: LoraSettings, task: str) -> LoraSettings:
    """``settings`` with ``family_targets`` for this loaded model."""
    targets = family_targets(str(getattr(model.config, "model_type", "")), task, settings.target_modules)
    return dataclasses.replace(settings, target_modules=targets)


@functools.lru_cache(maxsize=16)
def _model_type(model: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    from fedlowrank.models import _hub_kwargs, resolve_model_path

    try:
        path = resolve_model_path(model)
        return str(AutoConfig.from_pretrained(path, **_hub_kwargs(path, trust_remote_code)).model_type)
    except Exception:  # unreadable here: the model's load reports it; the configured targets stand until then
        return ""


def lora_targets(model: str, task: str, targets: list[str], trust_remote_code: bool = False) -> list[str]:
    """``family_targets`` before the model is loaded (its config.json read once): what the server's and the
    clients' code that names the adapted modules (fed-galore's trained weights, config checks) use."""
    if task != "causal-lm" or list(targets) != LoraSettings().target_modules:
        return list(targets)
    return family_targets(_model_type(model, trust_remote_code), task, targets)


def head_modules(model: torch.nn.Module) -> list[str]:
    return [name for name in HEAD_MODULE_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]


def attach_lora(model: PreTrainedModel, settings: LoraSettings, task: str = "seq-cls") -> PeftModel:
    """Wrap ``model`` with peft LoRA (or VeRA) adapters; checks targets and ranks first, with clear errors."""
    _check_targets(model, settings)
    if task not in PEFT_TASK_TYPES:
        raise AdapterConfigError(f"unknown task {task!r}; use one of {', '.join(PEFT_TASK_TYPES)}")
    # The head is always saved with the adapter for image-cls (frozen below when not trained), as peft's
    # SEQ_CLS does for seq-cls: a saved adapter then reloads with the very head it was evaluated with.
    train_heads = settings.train_head and task == "seq-cls"
    heads = head_modules(model) if (train_heads or task == "image-cls") else []
    common = {
        "task_type": PEFT_TASK_TYPES[task],
        "r": settings.r,
        "target_modules": list(settings.target_modules),
        "modules_to_save": heads or None,
    }
    if settings.adapter == "vera":
        adapter_config = VeraConfig(
            **common, vera_dropout=settings.dropout, projection_prng_key=0, save_projection=True
        )
    else:
        adapter_config = LoraConfig(
            **common,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            use_rslora=settings.use_rslora,
            init_lora_weights=True if settings.init == "default" else settings.init,
        )
    with warnings.catch_warnings():
        # peft asks transformers about gradient checkpointing through a name v5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, adapter_config)
    _freeze_untrained_head(peft_model, task, settings)
    return peft_model


def _freeze_untrained_head(peft_model: PeftModel, task: str, settings: LoraSettings) -> None:
    """The head is in modules_to_save (peft's SEQ_CLS adds it on its own); freeze it when not trained."""
    if task in CLASSIFICATION_TASKS and not settings.train_head:
        for name, param in peft_model.named_parameters():
            if any(f"{head}." in name for head in HEAD_MODULE_NAMES) and key_role(name) == "head":
                param.requires_grad_(False)


def _check_targets(model: torch.nn.Module, settings: LoraSettings) -> None:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers (weight stored d_in x d_out)

    linear_names = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D):
            linear_names[name] = module
    for target in settings.target_modules:
        matches = [m for name, m in linear_names.items() if name == target or name.endswith(f".{target}")]
        if not matches:
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
            raise AdapterConfigError(
                f"LoRA target module {target!r} matches no linear layer of this model. "
                f"Linear layer names here: {', '.join(suffixes)}"
            )
        for module in matches:
            if not module.weight.is_floating_point():  # a 4-/8-bit packed weight: its shape is not the layer's
                continue
            rows, cols = module.weight.shape
            if settings.r > min(rows, cols):
                raise AdapterConfigError(
                    f"LoRA rank r={settings.r} is larger than the dimensions of target {target!r} "
                    f"({rows} x {cols}); use r <= {min(rows, cols)}"
                )


# ---- state --------------------------------------------------------------------------------------
def adapter_state(model: PeftModel, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """A detached fp32 CPU copy of the adapter state (factors + saved head), peft key names."""
    state = _state_tensors(model)
    if state is None:
        state = get_peft_model_state_dict(model)
    if trainable_only:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if _param_name(model, k) in trainable}
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def _param_name(model: PeftModel, state_key: str) -> str:
    """Map a peft state-dict key back to the parameter name it was read from."""
    adapter = model.active_adapter
    if f".{LORA_A}." in state_key or f".{LORA_B}." in state_key:
        return state_key.replace(".weight", f".{adapter}.weight").replace(".bias", f".{adapter}.bias")
    if key_role(state_key) in ("A", "B"):  # VeRA's λ vectors
        return f"{state_key}.{adapter}"
    prefix, _, leaf = state_key.rpartition(".")
    return f"{prefix}.modules_to_save.{adapter}.{leaf}"


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Write ``state`` into the model's adapter (a subset of keys is fine when ``strict`` is False)."""
    live = _state_tensors(model)
    known = live if live is not None else get_peft_model_state_dict(model)
    unknown = sorted(set(state) - set(known))
    if unknown:
        raise KeyError(f"adapter state has keys the model does not know: {unknown[:5]}")
    if strict:
        missing = sorted(set(known) - set(state))
        if missing:
            raise KeyError(f"adapter state is missing keys: {missing[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(known[key].shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(known[key].shape)}")
    if live is None:  # peft's loader needs every saved-module key; missing ones keep their current values
        set_peft_model_state_dict(model, {**known, **state})
        return
    with torch.no_grad():
        for key, value in state.items():
            live[key].copy_(value)


_STATE_KEYS = "_fedlowrank_adapter_keys"


def _state_tensors(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """The live tensors behind peft's adapter state dict, by peft key (reads and writes without copies).

    peft's own get/set state-dict calls re-read the model config from disk each time (≈13 ms per call on a
    small model: most of a simulated client's overhead); the key list is asked once and cached on the model.
    None when a key maps to no parameter or buffer (then the callers use peft's calls).
    """
    places = model.__dict__.get(_STATE_KEYS)
    if places is None:
        places = {}
        for key in get_peft_model_state_dict(model):
            module_name, _, attribute = _param_name(model, key).rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                module = None
            if module is None or not isinstance(getattr(module, attribute, None), torch.Tensor):
                places = {}  # a layout this map does not know: use peft's calls
                break
            places[key] = (module, attribute)
        model.__dict__[_STATE_KEYS] = places
    if not places:
        return None
    return {key: getattr(module, attribute) for key, (module, attribute) in places.items()}


def write_marks(model: PeftModel, frozen_layers: Iterable[str] = ()) -> tuple[tuple[int, int], ...] | None:
    """Identity and in-place write counter of every adapter tensor and of the named layers' frozen weights:
    equal marks at two moments mean none of them was replaced or written in between (every in-place write,
    optimizers' and ``copy_`` included, bumps a tensor's counter). None when the adapter's tensors are not
    known (peft's own state-dict calls are in use)."""
    slots = _mark_slots(model, tuple(frozen_layers))
    if slots is None:
        return None
    return tuple((id(t), t._version) for t in [table[name] for table, name in slots])


_MARK_SLOTS = "_fedlowrank_mark_slots"


def _mark_slots(model: PeftModel, frozen_layers: tuple[str, ...]) -> list[tuple[dict, str]] | None:
    """Where ``write_marks``' tensors live: (the owning module's parameter, buffer or attribute table, name),
    found once per layout. Reading ``table[name]`` sees a replaced tensor as ``getattr`` would, without
    ``Module.__getattr__`` (≈1 µs a tensor: most of a mark, and marks are taken twice per simulated client)."""
    if _STATE_KEYS not in model.__dict__:
        _state_tensors(model)  # maps the adapter's keys to their modules, once
    places = model.__dict__[_STATE_KEYS]
    if not places:
        return None
    cached = model.__dict__.get(_MARK_SLOTS)
    if cached is not None and cached[0] is places and cached[1] == frozen_layers:
        return cached[2]
    owners = [*places.values(), *((_lora_layer(model, layer).base_layer, "weight") for layer in frozen_layers)]
    slots = [(_attribute_table(module, name), name) for module, name in owners]
    model.__dict__[_MARK_SLOTS] = (places, frozen_layers, slots)
    return slots


def _attribute_table(module: torch.nn.Module, name: str) -> dict:
    for table in (module._parameters, module._buffers, module.__dict__):
        if name in table:
            return table
    raise AttributeError(f"{type(module).__name__} has no tensor {name!r}")


# ---- the frozen weight: residuals folded in by FedEx-LoRA and FLoRA ---------------------------------
def lora_scale(settings: LoraSettings) -> float:
    """s = α/r, or α/√r with rsLoRA."""
    return settings.scale


_LAYER_MODULES = "_fedlowrank_lora_layers"


def _lora_layer(model: PeftModel, layer: str) -> torch.nn.Module:
    found = model.__dict__.setdefault(_LAYER_MODULES, {})  # get_submodule walks the path: ~60 µs a call
    if layer not in found:
        module = model.get_submodule(layer)
        if not hasattr(module, "base_layer"):
            raise KeyError(f"{layer} is not a LoRA layer")
        found[layer] = module
    return found[layer]


def base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """Copies of the frozen weights under every LoRA layer (to restore before applying residuals)."""
    layers = sorted({layer_name(k) for k in get_peft_model_state_dict(model) if layer_name(k)})
    return {layer: _lora_layer(model, layer).base_layer.weight.detach().clone() for layer in layers}


_RESIDUAL_LAYERS = "_fedlowrank_residual_layers"  # layers whose base weight holds a folded residual now


def set_base_residuals(
    model: PeftModel, originals: dict[str, torch.Tensor], residuals: dict[str, torch.Tensor]
) -> None:
    """W0 ← W0_original + ΔW for every layer in ``residuals``, W0_original elsewhere.

    ΔW is in product orientation (d_out x d_in); layers that store the weight transposed (GPT-2's
    Conv1D, peft's ``fan_in_fan_out``) get ΔWᵀ, the orientation FedEx-LoRA's official code gets wrong.
    """
    # Only layers changed before or changing now are written: a plain round then copies no base weight.
    changed = model.__dict__.setdefault(_RESIDUAL_LAYERS, set())
    with torch.no_grad():
        for layer, original in originals.items():
            if layer not in changed and layer not in residuals:
                continue
            module = _lora_layer(model, layer)
            weight = module.base_layer.weight
            if not weight.is_floating_point():
                raise AdapterConfigError(
                    f"layer {layer} holds a 4-/8-bit quantized weight, into which a method's residual (FedEx, FLoRA, "
                    "fed-galore) cannot be folded: leave quantize empty for this method (base-dtype = 'bfloat16' "
                    "halves memory instead)"
                )
            weight.copy_(original)
            changed.discard(layer)
            if layer in residuals:
                changed.add(layer)
                delta = residuals[layer].to(weight.device, weight.dtype)
                if getattr(module, "fan_in_fan_out", False):
                    delta = delta.T
                weight.add_(delta)


# ---- freezing and counting ------------------------------------------------------------------------
def set_trainable(model: PeftModel, *, lora_a: bool = True, lora_b: bool = True, head: bool = True) -> None:
    """Choose which adapter parts train. Everything outside the adapter stays frozen."""
    roles = model.__dict__.get(_PARAMETER_ROLES)
    if roles is None:  # walking the module tree costs more than a simulated client's step: do it once
        roles = [
            (param, key_role(name) if key_role(name) in ("A", "B") else "head" if ".modules_to_save." in name else "")
            for name, param in model.named_parameters()
        ]
        model.__dict__[_PARAMETER_ROLES] = roles
    wanted = {"A": lora_a, "B": lora_b, "head": head, "": False}
    for param, role in roles:
        if param.requires_grad != wanted[role]:  # reading the flag is a fraction of setting it (every client)
            param.requires_grad_(wanted[role])


_PARAMETER_ROLES = "_fedlowrank_parameter_roles"


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int
    trainable_bytes: int


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ParameterCount(
        trainable=sum(p.numel() for p in trainable),
        total=sum(p.numel() for p in model.parameters()),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
    )


@torch.no_grad()
def restrict_rank(model: PeftModel, rank: int) -> None:
    """Keep only the leading ``rank`` components of every LoRA layer (zero A's other rows, B's other columns).

    The zeroed components get zero gradients (their B columns and A rows are both zero), so training keeps
    the adapter at rank ``rank``: a rank-r_k client inside the shared rank-r model.
    """
    for name, param in model.named_parameters():
        role = key_role(name)
        if role == "A" and param.dim() == 2:
            param[rank:].zero_()
        elif role == "B" and param.dim() == 2:
            param[:, rank:].zero_()
