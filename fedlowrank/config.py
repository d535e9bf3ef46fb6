"""Run configuration: typed sections, TOML files, ``--set key=value`` overrides and flat Flower run-configs.

One set of keys is used everywhere: the TOML files in ``simulations/``, ``--set`` on the command line,
``[tool.flwr.app.config]`` and ``flwr run --run-config``. Top-level keys are written with dashes
(``num-rounds``); keys inside a section are dotted (``lora.r``, ``data.dirichlet-alpha``, ``dp.epsilon``).
The dataclass defaults *are* the default run; ``simulations/default.toml`` spells them out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


OPTIMIZERS = ("adamw", "sgd", "galore")
TASKS = ("seq-cls", "image-cls", "causal-lm")


@dataclass
class LoraSettings:
    # "lora", or "vera" (shared frozen random projections from the seed; trains λ_d (A side) and λ_b (B side)).
    adapter: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False
    # peft's ``init_lora_weights``: "default" (A kaiming-uniform, B = 0), "gaussian", "pissa", ...
    init: str = "default"
    # Train the task head (classifier) alongside the adapters. It is sent and aggregated like the factors.
    train_head: bool = True
    # Heterogeneous client ranks (FLoRA, FlexLoRA): client k trains rank client-ranks[k mod len] <= r (the
    # leading components of the rank-r adapter) and uploads only those. Empty: every client uses r.
    client_ranks: list[int] = field(default_factory=list)


@dataclass
class DataSettings:
    text_column: str = "text"
    # Second text of sentence-pair tasks (MNLI, QNLI, ...); empty for single-text tasks.
    text_pair_column: str = ""
    # Image column of task = "image-cls" (a datasets Image feature, or image file paths).
    image_column: str = "image"
    label_column: str = "label"
    # Hub dataset configuration (e.g. "mnli" for "nyu-mll/glue"); unused for local files.
    subset: str = ""
    # "iid", "dirichlet", "shards", "label-proportion" (FFA-LoRA's fixed split, see data.py), or "by-column"
    # (one client per distinct value of partition-column: feature non-IID, e.g. one client per DomainNet domain).
    partitioner: str = "dirichlet"
    # For "by-column": the column whose values define the clients (num-clients must equal their number).
    partition_column: str = ""
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    # For "label-proportion": one list of class proportions per client, e.g. [[0.1, 0.9], [0.9, 0.1]];
    # empty means FFA-LoRA's pattern (majority 0.9 on a rotating class).
    label_proportions: list[list[float]] = field(default_factory=list)
    min_partition_size: int = 10
    validation_fraction: float = 0.1
    max_length: int = 64
    # Cap the number of training / test examples (0 = all): for smoke tests and deployment tests.
    max_train_examples: int = 0
    max_test_examples: int = 0


@dataclass
class TrainSettings:
    local_epochs: float = 1.0
    # If > 0, the number of local optimizer steps per round (overrides local-epochs).
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    max_grad_norm: float = 0.0
    eval_batch_size: int = 128


@dataclass
class MethodSettings:
    """Options of the individual aggregation methods (ignored by the others)."""

    # FedSA-LoRA: keep the classifier head local too (the paper's GLUE setting), not only B.
    fedsa_local_head: bool = True
    # Where per-client state lives: "auto" (Flower Context.state, or disk beyond 256 clients),
    # "context" or "disk".
    client_state: str = "auto"
    # Folder for the disk store (default: <output-dir>/<name>/client-state).
    client_state_dir: str = ""
    # FedSVD: re-factorize B̄·A every this many rounds (0: never, i.e. FFA-LoRA with a broadcast A).
    fedsvd_period: int = 1
    # LoRA-FAIR: "closed-form" (ridge) or "iterative" (the paper's cosine objective, Adam on ΔB).
    fair_solver: str = "closed-form"
    fair_lambda: float = 0.01
    fair_iterations: int = 300
    fair_lr: float = 0.01


@dataclass
class DPSettings:
    """Differential privacy. Sample-level DP-SGD in every client when ``epsilon`` > 0 (0: off; ``inf`` is
    also off, the non-private reference of a privacy sweep); user-level DP on the server when
    ``user-noise-multiplier`` > 0. See docs in README ("Privacy")."""

    # Sample-level (ε, δ) budget of each client for the whole run.
    epsilon: float = 0.0
    delta: float = 1e-5
    # Per-sample clipping norm C.
    max_grad_norm: float = 1.0
    # How many rounds the σ calibration assumes a client joins: "every-round" (conservative) or
    # "expected" (num-rounds × fraction-train; a client picked more often refuses once its budget is spent).
    participation: str = "every-round"
    # "prv" (Opacus' PRV, upper bound; near-tight) or "rdp" (conservative).
    accountant: str = "prv"
    # Per-sample gradients: "hooks" (Opacus GradSampleHooks) or "fused" (fedlowrank's LoRA path).
    engine: str = "hooks"
    # Split Poisson batches into physical batches of at most this size (0: never split).
    max_physical_batch_size: int = 0
    # Fix σ instead of calibrating it from epsilon (0: calibrate). ε is still accounted and enforced.
    noise_multiplier: float = 0.0
    # User-level DP (DP-FedAvg): server clips each client's update to user-clip-norm and adds Gaussian
    # noise of std user-noise-multiplier × user-clip-norm to the sum (0: off). Needs weighting = "uniform".
    user_noise_multiplier: float = 0.0
    user_clip_norm: float = 1.0
    user_delta: float = 1e-5

    @property
    def sample_level(self) -> bool:
        return self.epsilon > 0 and math.isfinite(self.epsilon)

    @property
    def user_level(self) -> bool:
        return self.user_noise_multiplier > 0


@dataclass
class GaLoreSettings:
    """GaLore (``optimizer = "galore"``: GaLoreAdamW in clients and centralized training) and the
    ``fed-galore`` strategy. See README ("GaLore")."""

    # Rank r of the projected gradient / moments (and of fed-galore's uploads: r x n per weight).
    rank: int = 4
    # Refresh the basis every this many local steps (0: never after the first). fed-galore fixes it per round.
    update_gap: int = 200
    # GaLore's α: the projected update is scaled by it.
    scale: float = 0.25
    # Learning rate of the GaLore-projected weights (0: train.lr). Full weights usually want less than the
    # LoRA factors and the new head, which keep train.lr.
    lr: float = 0.0
    # "svd", "randomized-svd", "gaussian", "dct" or "identity" (fed-galore: "gaussian", from the seed).
    projector: str = "svd"
    # What the moments do when the basis changes: "keep", "reset" or "rotate".
    moment_policy: str = "keep"
    # Which trainable 2-D weights get GaLore (peft-style names: "query", "re:<regex>"; a LoRA factor belongs
    # to the layer it adapts). Empty: all of them (LoRA factors and train-modules weights), the head excepted.
    target_modules: list[str] = field(default_factory=list)
    # Base weights to unfreeze and train in full (modules that LoRA wraps, i.e. in lora.target-modules).
    # fed-galore trains these (empty: all of lora.target-modules) and freezes the LoRA factors.
    train_modules: list[str] = field(default_factory=list)
    # Give the classifier head GaLore too (it is tiny: by default it gets plain AdamW).
    include_head: bool = False


@dataclass
class RunConfig:
    name: str = "default"
    strategy: str = "fedit"
    num_rounds: int = 4
    num_clients: int = 10
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    model: str = "minilm"
    # "seq-cls" (sequence classification), "image-cls" (image classification, e.g. ViT) or "causal-lm".
    task: str = "seq-cls"
    dataset: str = "trec"
    # Folder with local dataset copies (<data-dir>/<dataset>/train.csv ...); empty: $FEDLOWRANK_DATA.
    data_dir: str = ""
    # "adamw", "sgd", or "galore" (GaLoreAdamW, settings in [galore]).
    optimizer: str = "adamw"
    # How clients are weighted in aggregation: "num-examples" or "uniform".
    weighting: str = "num-examples"
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs"
    # Evaluate the global adapter on the global test set every N rounds (and always after the last).
    server_eval_every: int = 1
    # How long the server waits for num-clients nodes to connect before it stops with an error.
    node_wait_seconds: float = 120.0
    # Local training in `fedlowrank simulate`: "sequential" (the ClientApp per client) or "batched" (the
    # sampled clients of a round in one forward/backward per step on the shared base; fedlowrank.engine).
    engine: str = "sequential"
    # Batched engine: at most this many clients per wave (0: all sampled clients at once).
    engine_wave_size: int = 0
    # Batched engine: a step's examples run longest first in chunks of at most this many padded tokens, each
    # padded to its own longest example (less padding, bounded activation memory); 0: automatic (4,096 on a
    # CPU, 32,768 on a GPU).
    engine_max_tokens: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    galore: GaLoreSettings = field(default_factory=GaLoreSettings)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
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
        section_name, _, leaf = key.rpartition(".")
        target: Any = self
        if section_name:
            section_attr = section_name.replace("-", "_")
            if section_attr not in _section_names():
                raise ConfigError(_unknown_key_message(key))
            target = getattr(self, section_attr)
        attr = leaf.replace("-", "_")
        hints = get_type_hints(type(target))
        if attr not in hints or attr in _section_names() and target is self:
            raise ConfigError(_unknown_key_message(key))
        setattr(target, attr, _coerce(key, value, hints[attr]))

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.num_rounds >= 1, "num-rounds must be >= 1")
        need(self.num_clients >= 1, "num-clients must be >= 1")
        need(0.0 < self.fraction_train <= 1.0, "fraction-train must be in (0, 1]")
        need(0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]")
        need(
            self.task in TASKS,
            f"task must be one of {', '.join(repr(t) for t in TASKS)}, got {self.task!r}",
        )
        need(
            self.optimizer in OPTIMIZERS,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        need(
            self.weighting in ("num-examples", "uniform"),
            f"weighting must be 'num-examples' or 'uniform', got {self.weighting!r}",
        )
        need(self.lora.r >= 1, "lora.r must be >= 1")
        need(self.lora.adapter in ("lora", "vera"), f"lora.adapter must be 'lora' or 'vera', got {self.lora.adapter!r}")
        need(self.lora.alpha > 0, "lora.alpha must be > 0")
        need(0.0 <= self.lora.dropout < 1.0, "lora.dropout must be in [0, 1)")
        need(bool(self.lora.target_modules), "lora.target-modules must name at least one module")
        if self.lora.client_ranks:
            need(
                all(1 <= r <= self.lora.r for r in self.lora.client_ranks),
                f"lora.client-ranks must lie in 1..lora.r={self.lora.r}, got {self.lora.client_ranks}",
            )
            need(
                self.strategy.lower() in ("flora", "flexlora"),
                "lora.client-ranks (heterogeneous ranks) is supported by strategy = 'flora' or 'flexlora'",
            )
            need(
                not (self.dp.sample_level or self.dp.user_level),
                "heterogeneous client ranks cannot be combined with DP yet",
            )
        partitioners = ("iid", "dirichlet", "shards", "label-proportion", "by-column")
        need(
            self.data.partitioner in partitioners,
            f"data.partitioner must be one of {partitioners}, got {self.data.partitioner!r}",
        )
        need(
            self.data.partitioner != "by-column" or bool(self.data.partition_column),
            'data.partitioner = "by-column" needs data.partition-column (e.g. "domain"): one client per value',
        )
        need(self.data.dirichlet_alpha > 0, "data.dirichlet-alpha must be > 0")
        need(0.0 <= self.data.validation_fraction < 1.0, "data.validation-fraction must be in [0, 1)")
        need(self.data.max_length >= 8, "data.max-length must be >= 8")
        need(self.train.batch_size >= 1, "train.batch-size must be >= 1")
        need(self.train.lr > 0, "train.lr must be > 0")
        need(
            self.train.local_steps > 0 or self.train.local_epochs > 0,
            "set train.local-steps or train.local-epochs > 0",
        )
        need(self.server_eval_every >= 1, "server-eval-every must be >= 1")
        need(self.engine in ("sequential", "batched"), f"engine must be 'sequential' or 'batched', got {self.engine!r}")
        need(self.engine_wave_size >= 0, "engine-wave-size must be >= 0")
        need(self.engine_max_tokens >= 0, "engine-max-tokens must be >= 0")
        need(
            not (self.engine == "batched" and self.task == "image-cls"),
            "engine = 'batched' supports text tasks only (it batches token sequences); use engine = 'sequential' "
            "for task = 'image-cls'",
        )
        need(
            self.method.client_state in ("auto", "context", "disk"),
            f"method.client-state must be 'auto', 'context' or 'disk', got {self.method.client_state!r}",
        )
        need(self.method.fedsvd_period >= 0, "method.fedsvd-period must be >= 0")
        need(
            self.method.fair_solver in ("closed-form", "iterative"),
            f"method.fair-solver must be 'closed-form' or 'iterative', got {self.method.fair_solver!r}",
        )
        need(self.method.fair_lambda >= 0, "method.fair-lambda must be >= 0")
        need(self.dp.epsilon >= 0, "dp.epsilon must be >= 0 (0 or inf: no DP-SGD)")
        need(0 < self.dp.delta < 1, "dp.delta must be in (0, 1)")
        need(self.dp.max_grad_norm > 0, "dp.max-grad-norm must be > 0")
        need(
            self.dp.participation in ("every-round", "expected"),
            f"dp.participation must be 'every-round' or 'expected', got {self.dp.participation!r}",
        )
        need(self.dp.accountant in ("prv", "rdp"), f"dp.accountant must be 'prv' or 'rdp', got {self.dp.accountant!r}")
        need(self.dp.engine in ("hooks", "fused"), f"dp.engine must be 'hooks' or 'fused', got {self.dp.engine!r}")
        need(self.dp.max_physical_batch_size >= 0, "dp.max-physical-batch-size must be >= 0")
        need(self.dp.noise_multiplier >= 0, "dp.noise-multiplier must be >= 0")
        need(self.dp.user_noise_multiplier >= 0, "dp.user-noise-multiplier must be >= 0")
        need(self.dp.user_clip_norm > 0, "dp.user-clip-norm must be > 0")
        if self.dp.sample_level:
            need(self.lora.adapter == "lora", "DP-SGD supports lora.adapter = 'lora' only (not VeRA) for now")
        if self.dp.user_level:
            need(
                self.weighting == "uniform",
                'user-level DP bounds each client\'s influence only with equal weights: set weighting = "uniform"',
            )
        self._validate_galore(need)

    def _validate_galore(self, need: Any) -> None:
        from fedlowrank.projectors import MOMENT_POLICIES, PROJECTOR_KINDS  # torch: only when validating

        galore = self.galore
        fed_galore = self.strategy.lower() == "fed-galore"
        need(galore.rank >= 1, "galore.rank must be >= 1")
        need(galore.lr >= 0, "galore.lr must be >= 0 (0: train.lr)")
        need(galore.update_gap >= 0, "galore.update-gap must be >= 0 (0: never refresh the basis)")
        need(math.isfinite(galore.scale) and galore.scale > 0, "galore.scale must be a finite number > 0")
        need(
            galore.projector in PROJECTOR_KINDS,
            f"galore.projector must be one of {', '.join(PROJECTOR_KINDS)}, got {galore.projector!r}",
        )
        need(
            galore.moment_policy in MOMENT_POLICIES,
            f"galore.moment-policy must be one of {', '.join(MOMENT_POLICIES)}, got {galore.moment_policy!r}",
        )
        unwrapped = [m for m in galore.train_modules if m not in self.lora.target_modules]
        need(
            not unwrapped,
            f"galore.train-modules {unwrapped} are not in lora.target-modules {self.lora.target_modules}: only "
            "the base weights under LoRA layers can be unfrozen (the workspace restores exactly those)",
        )
        uses_galore = self.optimizer == "galore" or fed_galore
        if uses_galore:
            need(not self.dp.sample_level, "DP-SGD (dp.epsilon > 0) does not support GaLore yet")
        if self.optimizer == "galore" and not fed_galore and not galore.train_modules:
            # Only the LoRA factors (r x d) are trainable 2-D weights: their smaller side is lora.r.
            need(
                self.lora.adapter == "lora",
                "optimizer = 'galore' needs 2-D trainable weights: VeRA trains only vectors; "
                "set galore.train-modules or lora.adapter = 'lora'",
            )
            need(
                galore.rank < self.lora.r,
                f"galore.rank={galore.rank} is not below lora.r={self.lora.r}: the only 2-D trainable weights are "
                f"the LoRA factors, whose smaller side is lora.r, so projecting them saves nothing. Use "
                f"galore.rank < {self.lora.r}, or unfreeze base weights with galore.train-modules",
            )
        if fed_galore:
            need(
                self.optimizer in ("adamw", "galore"),
                "strategy 'fed-galore' trains with GaLoreAdamW: set optimizer = 'galore' (or 'adamw'), not 'sgd'",
            )
            need(
                galore.projector == "gaussian",
                "strategy 'fed-galore' supports galore.projector = 'gaussian' (the round's basis from a seed); "
                "an SVD of the previous aggregate would never leave the first round's span",
            )
            need(
                self.train.weight_decay == 0,
                "strategy 'fed-galore' needs train.weight-decay = 0: full-space decay moves weights out of the "
                "round's shared span, so the server could not rebuild the clients' updates exactly",
            )

    # ---- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with dashed keys, as written in the TOML files."""

        def convert(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj):
                return {f.name.replace("_", "-"): convert(getattr(obj, f.name)) for f in fields(obj)}
            return obj

        return convert(self)

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


def _section_names() -> set[str]:
    return {f.name for f in fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}  # type: ignore[arg-type]


def all_keys() -> list[str]:
    return sorted(_flatten(RunConfig().to_dict()).keys())


def _unknown_key_message(key: str) -> str:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)}"


def _strict_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError
    return int(number)


def _list_to_string(value: list) -> str:
    if value and isinstance(value[0], list):
        return ";".join(",".join(str(x) for x in row) for row in value)
    return ",".join(str(x) for x in value)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce a TOML/CLI/Flower value to the field's type, or say clearly why it cannot be."""
    hint_text = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
    try:
        if hint is bool or hint_text == "bool":
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            return bool(value)
        if hint is int or hint_text == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float or hint_text == "float":
            return float(value)
        if hint is str or hint_text == "str":
            if not isinstance(value, str | int | float):
                raise ValueError
            return str(value)
        if hint_text == "list[str]":
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            return [str(v) for v in value]
        if hint_text == "list[int]":
            parts = value.split(",") if isinstance(value, str) else value
            return [_strict_int(part) for part in parts if str(part).strip()]
        if hint_text == "list[list[float]]":
            if isinstance(value, str):
                return [[float(x) for x in row.split(",")] for row in value.split(";") if row.strip()]
            return [[float(x) for x in row] for row in value]
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"config key {key!r}: unsupported type {hint_text}")
    raise ConfigError(f"config key {key!r}: cannot use {value!r} as {hint_text}")
