"""Run configuration: typed sections, TOML files, ``--set key=value`` overrides and flat Flower run-configs.

One set of keys is used everywhere: the TOML files in ``simulations/``, ``--set`` on the command line,
``[tool.flwr.app.config]`` and ``flwr run --run-config``. Top-level keys are written with dashes
(``num-rounds``); keys inside a section are dotted (``lora.r``, ``data.dirichlet-alpha``, ``dp.epsilon``).
Every field is a :func:`setting`: its default, its help text (``fedlowrank keys``) and its allowed values,
checked by :func:`check_settings`. The dataclass defaults *are* the default run; ``simulations/default.toml``
spells them out.

Method options are the one part this module does not type: ``method.<method>.<option>`` keys are kept as
given in ``RunConfig.method`` and checked by the method registry (``strategies/registry.py``), where each
method declares its own. A client never needs them: what it must know travels in its instructions.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


METHOD_SECTION = "method"


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    infinite: bool = False,
) -> Any:
    """A config field: default, help text and the values it accepts (checked by :func:`check_settings`).
    Float settings must be finite unless ``infinite`` (``dp.epsilon = inf``: no DP)."""
    rules = {"choices": choices, "minimum": minimum, "maximum": maximum, "above": above, "below": below}
    rules["infinite"] = infinite or None
    metadata = {"help": help, **{k: v for k, v in rules.items() if v is not None}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_settings(obj: Any, prefix: str = "") -> None:
    """Each field of dataclass ``obj`` against its declared choices and bounds; one clear error for the first."""
    for spec in fields(obj):
        value, rules = getattr(obj, spec.name), spec.metadata
        key = prefix + spec.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value) and not (math.isinf(value) and rules.get("infinite")):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        choices = rules.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        for rule, holds, words in (
            ("minimum", lambda v, b: v >= b, ">="),
            ("maximum", lambda v, b: v <= b, "<="),
            ("above", lambda v, b: v > b, ">"),
            ("below", lambda v, b: v < b, "<"),
        ):
            if rule in rules and not holds(value, rules[rule]):
                raise ConfigError(f"{key} must be {words} {rules[rule]:g}, got {value!r}")


def settings_help(cls: type) -> dict[str, str]:
    return {spec.name.replace("_", "-"): spec.metadata.get("help", "") for spec in fields(cls)}


OPTIMIZERS = ("adamw", "sgd", "galore")
TASKS = ("seq-cls", "image-cls", "causal-lm")
PARTITIONERS = ("iid", "dirichlet", "shards", "label-proportion", "by-column", "quantity-skew")


@dataclass
class LoraSettings:
    adapter: str = setting(
        "lora",
        "'lora', or 'vera' (frozen random projections from the seed; trains λ_d and λ_b)",
        choices=("lora", "vera"),
    )
    r: int = setting(8, "LoRA rank", minimum=1)
    alpha: float = setting(16.0, "LoRA α: the product B·A is scaled by α/r (α/√r with rsLoRA)", above=0)
    dropout: float = setting(0.0, "dropout on the adapter input", minimum=0, below=1)
    target_modules: list[str] = setting(["query", "value"], "modules that get adapters (peft names)")
    use_rslora: bool = setting(False, "rsLoRA scaling α/√r")
    init: str = setting("default", "peft's init_lora_weights: 'default' (A kaiming-uniform, B = 0), 'gaussian', ...")
    train_head: bool = setting(True, "train the task head (classifier) too; it is sent and aggregated like the factors")
    client_ranks: list[int] = setting(
        [], "heterogeneous ranks: client k trains rank client-ranks[k mod len] <= r (empty: every client r)"
    )

    @property
    def scale(self) -> float:
        """s = α/r, or α/√r with rsLoRA: a layer's weight is W0 + s·B·A."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass
class DataSettings:
    text_column: str = setting("text", "text column")
    text_pair_column: str = setting("", "second text of sentence-pair tasks (MNLI, QNLI, ...); empty: single text")
    image_column: str = setting("image", "image column of task = 'image-cls' (an Image feature or file paths)")
    label_column: str = setting("label", "label column")
    subset: str = setting("", "hub dataset configuration (e.g. 'mnli' for 'nyu-mll/glue'); unused for local files")
    partitioner: str = setting(
        "dirichlet", "how the training set is split (label-proportion: fixed class proportions)", choices=PARTITIONERS
    )
    partition_column: str = setting("", "by-column: the column whose values are the clients (feature non-IID)")
    dirichlet_alpha: float = setting(
        0.5, "Dirichlet α of the label skew, or of the sizes with quantity-skew (smaller: more skewed)", above=0
    )
    shards_per_client: int = setting(2, "shards: label-sorted shards per client", minimum=1)
    label_proportions: list[list[float]] = setting(
        [], "label-proportion: class proportions per client, e.g. [[0.1, 0.9], [0.9, 0.1]]; empty: 0.9 on one class"
    )
    min_partition_size: int = setting(10, "every client gets at least this many examples", minimum=0)
    validation_fraction: float = setting(
        0.1, "share of each client's data held out for its validation", minimum=0, below=1
    )
    max_length: int = setting(64, "tokens per example (longer texts are truncated)", minimum=8)
    prompt_column: str = setting(
        "", "causal-lm: the prompt column (empty: detected: question/answer, Alpaca, chat messages, ...)"
    )
    response_column: str = setting("", "causal-lm: the response column, learned and scored (empty: detected)")
    prompt_template: str = setting(
        "",
        "causal-lm without a chat template: str.format template of the prompt over the row's columns and {prompt} "
        "(empty: 'Question: {prompt}\nAnswer:', Alpaca's template for Alpaca rows)",
    )
    max_train_examples: int = setting(0, "cap the training examples (0: all): smoke tests", minimum=0)
    max_test_examples: int = setting(0, "cap the test examples (0: all)", minimum=0)
    unseen_test_labels: str = setting(
        "refuse",
        "a label only the test split has: 'refuse' the dataset, or 'keep' it (reported in the summary)",
        choices=("refuse", "keep"),
    )


@dataclass
class TrainSettings:
    local_epochs: float = setting(1.0, "local epochs per round (when local-steps is 0)", minimum=0)
    local_steps: int = setting(0, "local optimizer steps per round (> 0 overrides local-epochs)", minimum=0)
    batch_size: int = setting(32, "batch size (DP-SGD: the expected Poisson batch size)", minimum=1)
    lr: float = setting(5e-3, "learning rate", above=0)
    weight_decay: float = setting(0.0, "weight decay", minimum=0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0)
    max_grad_norm: float = setting(
        0.0, "clip each step's gradient norm to this (0: off; DP-SGD clips per example)", minimum=0
    )
    eval_batch_size: int = setting(128, "batch size of evaluation", minimum=1)
    generate_every: int = setting(
        0,
        "causal-lm: score exact match of generated answers every this many rounds (0: after the last only)",
        minimum=0,
    )
    max_new_tokens: int = setting(256, "causal-lm: most tokens generated per answer (greedy, stops at EOS)", minimum=1)
    generate_examples: int = setting(
        200, "causal-lm: test examples whose answers are generated for exact match (0: all)", minimum=0
    )


@dataclass
class DPSettings:
    """Differential privacy. Sample-level DP-SGD in every client when ``epsilon`` > 0 (0: off; ``inf`` is
    also off, the non-private reference of a privacy sweep); user-level DP on the server when
    ``user-noise-multiplier`` > 0. See the README ("Privacy")."""

    epsilon: float = setting(
        0.0, "each client's sample-level ε budget for the whole run (0 or inf: no DP-SGD)", minimum=0, infinite=True
    )
    delta: float = setting(1e-5, "δ of the sample-level guarantee", above=0, below=1)
    max_grad_norm: float = setting(1.0, "per-example clipping norm C", above=0)
    participation: str = setting(
        "every-round",
        "rounds the σ calibration assumes a client joins: 'every-round' or 'expected' (num-rounds × fraction-train)",
        choices=("every-round", "expected"),
    )
    accountant: str = setting("prv", "'prv' (Opacus' PRV, upper bound) or 'rdp'", choices=("prv", "rdp"))
    engine: str = setting(
        "hooks",
        "per-example gradients: 'hooks' (Opacus) or 'fused' (fedlowrank's LoRA path)",
        choices=("hooks", "fused"),
    )
    max_physical_batch_size: int = setting(
        0, "split Poisson batches into physical ones of at most this (0: never)", minimum=0
    )
    noise_multiplier: float = setting(0.0, "fix σ instead of calibrating it from epsilon (0: calibrate)", minimum=0)
    lr: float = setting(
        0.0,
        "learning rate of DP-SGD clients (0: train.lr); per-example clipping rescales the gradient, so DP-SGD "
        "usually wants its own",
        minimum=0,
    )
    user_noise_multiplier: float = setting(
        0.0,
        "user-level DP on the server: noise multiplier z of DP-FedAvg (0: off); needs weighting = 'uniform'",
        minimum=0,
    )
    user_clip_norm: float = setting(1.0, "user-level DP: each client's update is clipped to this L2 norm", above=0)
    user_delta: float = setting(1e-5, "δ of the user-level guarantee", above=0, below=1)

    @property
    def sample_level(self) -> bool:
        return self.epsilon > 0 and math.isfinite(self.epsilon)

    @property
    def user_level(self) -> bool:
        return self.user_noise_multiplier > 0

    def lr_setting(self, train: TrainSettings) -> tuple[str, float]:
        """The key and value of the learning rate clients train at: ``dp.lr`` for DP-SGD clients when it is
        set, else ``train.lr``."""
        return ("dp.lr", self.lr) if self.sample_level and self.lr > 0 else ("train.lr", train.lr)

    def local_train(self, train: TrainSettings) -> TrainSettings:
        """The settings a client's local training uses: ``train`` at the learning rate of ``lr_setting``."""
        key, lr = self.lr_setting(train)
        return train if key == "train.lr" else replace(train, lr=lr)


@dataclass
class GaLoreSettings:
    """GaLore (``optimizer = "galore"``: GaLoreAdamW in clients and centralized training) and federated GaLore.
    See the README ("GaLore")."""

    rank: int = setting(4, "rank r of the projected gradient and moments (federated GaLore: of the uploads)", minimum=1)
    update_gap: int = setting(
        200, "refresh the basis every this many local steps (0: never after the first)", minimum=0
    )
    scale: float = setting(0.25, "GaLore's α: the projected update is scaled by it", above=0)
    lr: float = setting(0.0, "learning rate of the projected weights (0: train.lr)", minimum=0)
    projector: str = setting("svd", "'svd', 'randomized-svd', 'gaussian', 'dct' or 'identity'")
    moment_policy: str = setting("keep", "what the moments do when the basis changes: 'keep', 'reset' or 'rotate'")
    target_modules: list[str] = setting(
        [], "trainable 2-D weights that get GaLore (peft names, 're:<regex>'); empty: all but the head"
    )
    train_modules: list[str] = setting(
        [], "base weights under LoRA layers to unfreeze and train in full (a subset of lora.target-modules)"
    )
    include_head: bool = setting(False, "give the classifier head GaLore too (by default it gets plain AdamW)")


@dataclass
class ServerSettings:
    """How the server treats nodes and replies: waits, timeouts, and which replies it accepts."""

    min_available: int = setting(
        1,
        "a round waits node-wait-seconds for all num-clients nodes, then goes on if at least this many are connected "
        "(and stops, resumable, if not); a round with fewer replies is retried once, then the run stops",
        minimum=1,
    )
    min_valid_replies: int = setting(
        1, "fewer valid train replies than this: the round keeps the previous global model", minimum=1
    )
    max_update_norm: float = setting(
        0.0, "reject a client whose update (upload minus global) has a larger L2 norm (0: no bound)", minimum=0
    )
    train_timeout: float = setting(
        0.0,
        "seconds a round waits for replies (0: no limit); a client that has not replied counts as failed",
        minimum=0,
    )


@dataclass
class RunConfig:
    name: str = setting("default", "run name: output goes to <output-dir>/<name>/")
    strategy: str = setting("", "the aggregation method (`fedlowrank keys` lists them; empty: the default method)")
    num_rounds: int = setting(4, "federated rounds (centralized: epochs of local-epochs each)", minimum=1)
    num_clients: int = setting(10, "clients (data partitions); one SuperNode each in a deployment", minimum=1)
    fraction_train: float = setting(1.0, "share of the clients sampled to train each round", above=0, maximum=1)
    fraction_evaluate: float = setting(1.0, "share of the clients sampled to evaluate each round", minimum=0, maximum=1)
    model: str = setting("minilm", "Hugging Face model name or local folder ('minilm': the offline MiniLM-L6)")
    task: str = setting("seq-cls", "'seq-cls', 'image-cls' or 'causal-lm'", choices=TASKS)
    dataset: str = setting("trec", "a dataset under data-dir, a folder or file path, or a hub name when online")
    data_dir: str = setting(
        "", "folder with local datasets (<data-dir>/<dataset>/train.csv ...); empty: $FEDLOWRANK_DATA"
    )
    optimizer: str = setting(
        "adamw", "'adamw', 'sgd' or 'galore' (GaLoreAdamW, settings in [galore])", choices=OPTIMIZERS
    )
    weighting: str = setting(
        "num-examples",
        "client weights in aggregation: 'num-examples' or 'uniform'",
        choices=("num-examples", "uniform"),
    )
    seed: int = setting(0, "seed of the partitions, initialisation, sampling and training")
    device: str = setting("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    output_dir: str = setting("runs", "where runs are written")
    server_eval_every: int = setting(
        1, "evaluate the global model every this many rounds (and after the last)", minimum=1
    )
    node_wait_seconds: float = setting(120.0, "how long the server waits for the nodes it needs", minimum=0)
    engine: str = setting(
        "sequential",
        "local training in simulation: 'sequential' (the ClientApp per client) or 'batched' (many clients at once)",
        choices=("sequential", "batched"),
    )
    engine_wave_size: int = setting(0, "batched engine: at most this many clients at once (0: all sampled)", minimum=0)
    cohort_nodes: int = setting(
        0,
        "nodes that each host a cohort of virtual clients (client k on node k mod N) and train the sampled ones "
        "together with the batched engine; 0: one node per client",
        minimum=0,
    )
    engine_max_tokens: int = setting(
        0,
        "padded tokens per forward chunk, batched engine and DP-SGD clients (0: 4,096 on a CPU, 32,768 on a GPU)",
        minimum=0,
    )
    client_state: str = setting(
        "auto",
        "where clients keep state between rounds: 'context' (Flower's Context.state, in memory), 'disk', or 'auto' "
        "(disk where the node has a state-dir, which fedlowrank simulate gives every virtual node)",
        choices=("auto", "context", "disk"),
    )
    client_state_dir: str = setting(
        "", "in-process runs: folder of the disk state store (default <output-dir>/<name>/client-state)"
    )
    method_modules: list[str] = setting(
        [], "extra modules (import names or .py paths) that register methods, e.g. your own method's file"
    )
    trust_remote_code: bool = setting(False, "let transformers run code shipped with a hub model (off: never)")
    base_dtype: str = setting(
        "float32",
        "dtype of the frozen base weights: 'float32', or 'bfloat16' (half the memory; adapters stay float32)",
        choices=("float32", "bfloat16"),
    )
    quantize: str = setting(
        "",
        "a 4- or 8-bit frozen base through bitsandbytes ('4bit', '8bit'; CUDA only); empty: none",
        choices=("", "4bit", "8bit"),
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory for long sequences, ~30% slower"
    )
    resume: bool = setting(False, "continue the run in <output-dir>/<name>/ from its last checkpoint")
    overwrite: bool = setting(False, "replace an existing run in <output-dir>/<name>/ (otherwise it is refused)")
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    galore: GaLoreSettings = field(default_factory=GaLoreSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    # ``method.<method>.<option>`` values as given; typed and checked by the method registry.
    method: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        flat = _flatten(raw)
        flat.update(parse_overrides(overrides or []))
        return cls.from_flat(flat)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Build from flat ``{"num-rounds": 3, "lora.r": 4}`` keys (TOML, --set or Flower run_config)."""
        config = cls()
        for key, value in flat.items():
            config.set(key, value)
        config.validate()
        return config

    def set(self, key: str, value: Any) -> None:
        if key.startswith(f"{METHOD_SECTION}."):
            method, _, option = key[len(METHOD_SECTION) + 1 :].partition(".")
            if not method or not option:
                raise ConfigError(f"method options are written method.<method>.<option>, got {key!r}")
            self.method.setdefault(method, {})[option] = value
            return
        section_name, _, leaf = key.rpartition(".")
        target: Any = self
        if section_name:
            section_attr = section_name.replace("-", "_")
            if section_attr not in _section_names():
                raise ConfigError(_unknown_key_message(key))
            target = getattr(self, section_attr)
        attr = leaf.replace("-", "_")
        hints = get_type_hints(type(target))
        if attr not in hints or (target is self and (attr in _section_names() or attr == METHOD_SECTION)):
            raise ConfigError(_unknown_key_message(key))
        setattr(target, attr, coerce_value(key, value, hints[attr]))

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Every section's declared rules, then the rules that tie settings together (method-specific ones are
        the registry's)."""
        check_settings(self)
        for section in _section_names():
            check_settings(getattr(self, section), f"{section.replace('_', '-')}.")

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(bool(self.lora.target_modules), "lora.target-modules must name at least one module")
        need(
            all(1 <= r <= self.lora.r for r in self.lora.client_ranks),
            f"lora.client-ranks must lie in 1..lora.r={self.lora.r}, got {self.lora.client_ranks}",
        )
        need(
            not (self.lora.client_ranks and (self.dp.sample_level or self.dp.user_level)),
            "heterogeneous client ranks cannot be combined with DP yet",
        )
        need(
            self.data.partitioner != "by-column" or bool(self.data.partition_column),
            'data.partitioner = "by-column" needs data.partition-column (e.g. "domain"): one client per value',
        )
        need(
            self.train.local_steps > 0 or self.train.local_epochs > 0, "set train.local-steps or train.local-epochs > 0"
        )
        need(
            not (self.engine == "batched" and self.task == "image-cls"),
            "engine = 'batched' supports text tasks only (it batches token sequences); use engine = 'sequential' "
            "for task = 'image-cls'",
        )
        need(
            not (self.dp.sample_level and self.lora.adapter != "lora"),
            "DP-SGD supports lora.adapter = 'lora' only (not VeRA) for now",
        )
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other: pick one")
        need(
            self.cohort_nodes <= self.num_clients,
            f"cohort-nodes={self.cohort_nodes} exceeds num-clients={self.num_clients}: every node hosts a client",
        )
        need(
            not (self.cohort_nodes and self.task == "image-cls"),
            "cohort nodes train with the batched engine, which supports text tasks only: set cohort-nodes = 0 for "
            "task = 'image-cls'",
        )
        need(
            self.server.min_available <= self.num_clients,
            f"server.min-available={self.server.min_available} exceeds num-clients={self.num_clients}",
        )
        need(
            not self.dp.user_level or self.weighting == "uniform",
            'user-level DP bounds each client\'s influence only with equal weights: set weighting = "uniform"',
        )
        need(
            self.task == "causal-lm" or (self.base_dtype == "float32" and not self.quantize),
            "base-dtype and quantize apply to task = 'causal-lm' (classification heads train in float32)",
        )
        need(
            not (self.gradient_checkpointing and self.dp.sample_level and self.dp.engine == "hooks"),
            "gradient-checkpointing re-runs forwards in the backward pass, which Opacus' hooks would record twice: "
            "use dp.engine = 'fused' with it, or turn gradient-checkpointing off",
        )
        self._validate_galore(need)

    def _validate_galore(self, need: Any) -> None:
        from fedlowrank.projectors import MOMENT_POLICIES, PROJECTOR_KINDS  # torch: only when validating

        galore = self.galore
        need(math.isfinite(galore.scale), "galore.scale must be a finite number > 0")
        need(
            galore.projector in PROJECTOR_KINDS,
            f"galore.projector must be one of {', '.join(PROJECTOR_KINDS)}, got {galore.projector!r}",
        )
        need(
            galore.moment_policy in MOMENT_POLICIES,
            f"galore.moment-policy must be one of {', '.join(MOMENT_POLICIES)}, got {galore.moment_policy!r}",
        )
        if galore.train_modules:
            from fedlowrank.adapters import lora_targets  # reads the model's config.json for a causal LM

            targets = lora_targets(self.model, self.task, self.lora.target_modules, self.trust_remote_code)
            unwrapped = [m for m in galore.train_modules if m not in targets]
            need(
                not unwrapped,
                f"galore.train-modules {unwrapped} are not in lora.target-modules {targets}: only the base weights "
                "under LoRA layers can be unfrozen (the workspace restores exactly those)",
            )
        need(
            not (self.optimizer == "galore" and self.dp.sample_level),
            "DP-SGD (dp.epsilon > 0) does not support GaLore yet",
        )

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with dashed keys, as written in the TOML files (method options as given)."""

        def convert(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name.replace("_", "-"): convert(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, dict):
                return {key: convert(value) for key, value in obj.items()}
            return obj

        out = convert(self)
        if not out[METHOD_SECTION]:
            del out[METHOD_SECTION]
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Scalar-only flat keys, the form Flower's run_config accepts (lists become comma strings)."""
        flat = {}
        for key, value in _flatten(self.to_dict()).items():
            if isinstance(value, list):
                value = _list_to_string(value)
            flat[key] = value
        return flat

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.environ.get("FEDLOWRANK_DATA", "")


# ---- helpers ----------------------------------------------------------------------------------
def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["num-rounds=3", "lora.target-modules=[\"query\"]"]`` -> typed values (TOML syntax, else a string)."""
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        parsed[key.strip()] = _parse_value(text.strip())
    return parsed


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def _section_names() -> list[str]:
    return [f.name for f in fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)]  # type: ignore[arg-type]


def all_keys() -> list[str]:
    return sorted(_flatten(RunConfig().to_dict()).keys())


def key_help() -> dict[str, str]:
    """Every core config key with its help text."""
    helps = {key: text for key, text in settings_help(RunConfig).items() if key not in _dashed_sections()}
    for section in _section_names():
        prefix = section.replace("_", "-")
        cls = type(getattr(RunConfig(), section))
        helps.update({f"{prefix}.{key}": text for key, text in settings_help(cls).items()})
    return helps


def _dashed_sections() -> set[str]:
    return {name.replace("_", "-") for name in (*_section_names(), METHOD_SECTION)}


def _unknown_key_message(key: str) -> str:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)} (and method.<method>.<option>)"


def _strict_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError
    return int(number)


def _list_to_string(value: list) -> str:
    if value and isinstance(value[0], list):
        return ";".join(",".join(str(x) for x in row) for row in value)
    return ",".join(str(x) for x in value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError
        return lowered in ("true", "1", "yes")
    return bool(value)


def _as_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError
    return int(value)


def _as_str(value: Any) -> str:
    if not isinstance(value, str | int | float):
        raise ValueError
    return str(value)


def _as_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]


def _as_int_list(value: Any) -> list[int]:
    parts = value.split(",") if isinstance(value, str) else value
    return [_strict_int(part) for part in parts if str(part).strip()]


def _as_float_rows(value: Any) -> list[list[float]]:
    if isinstance(value, str):
        return [[float(x) for x in row.split(",")] for row in value.split(";") if row.strip()]
    return [[float(x) for x in row] for row in value]


_COERCIONS = {
    "bool": _as_bool,
    "int": _as_int,
    "float": float,
    "str": _as_str,
    "list[str]": _as_str_list,
    "list[int]": _as_int_list,
    "list[list[float]]": _as_float_rows,
    "tuple[str, ...]": lambda value: tuple(_as_str_list(value)),
}


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce a TOML/CLI/Flower value to the field's type, or say clearly why it cannot be."""
    hint_text = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
    convert = _COERCIONS.get(hint_text or "")
    if convert is None:
        raise ConfigError(f"config key {key!r}: unsupported type {hint_text}")
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: cannot use {value!r} as {hint_text}") from None
