"""The fedlowrank ClientApp (Flower Message API): local LoRA training and evaluation for every method.

The model, tokenizer and this node's data partition are loaded once per process (``get_workspace``);
each message only swaps adapter tensors in. The server's config flags say what to train (A, B, head),
what to upload, and whether B (and the head) are this client's own (FedSA-LoRA), kept between rounds in
the client's state: Flower's ``Context.state`` or, for many simulated clients, a disk store.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.adapters import (
    adapter_state,
    client_rank,
    load_adapter_state,
    lora_factors,
    restrict_rank,
    select_roles,
    set_trainable,
    slice_rank,
)
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.galore_setup import PROJECTED_SUFFIX, fed_galore_client_train, fed_galore_modules
from fedlowrank.metrics import personalization_gap
from fedlowrank.models import pick_device
from fedlowrank.privacy.accounting import (
    ClientDPPlan,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    ensure_within_budget,
    plan_client,
)
from fedlowrank.privacy.dp_sgd import DPTrainResult, train_private
from fedlowrank.runtime import Workspace, get_workspace
from fedlowrank.state import ClientStateStore, DiskStateStore
from fedlowrank.training import TrainResult, evaluate, train_local
from strategies.common import a_checksum
from strategies.records import record_to_state, state_to_record

LOCAL_ADAPTER = "local-adapter"  # FedSA: this client's own B (and head)
LAST_TRAINED_A = "last-trained-a"  # FedSA: the A this client trained last, for the personalisation gap
DP_STATE = "dp-accountant"  # DP-SGD: this client's accountant history and its σ plan, for the whole run
DISK_STATE_ABOVE = 256  # "auto" keeps state in Context.state up to this many clients


class ContextStateStore:
    """Client state in Flower's ``Context.state`` (persists across rounds in simulation and on a SuperNode)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None:
        record = self.context.state.array_records.get(f"fedlowrank.{name}")
        return None if record is None else record_to_state(record)

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.context.state[f"fedlowrank.{name}"] = state_to_record(tensors)


def resolve_config(context: Context, bound: RunConfig | None) -> RunConfig:
    return bound if bound is not None else RunConfig.from_flat(dict(context.run_config))


def state_store(config: RunConfig, context: Context) -> ClientStateStore:
    kind = config.method.client_state
    if kind == "auto":
        kind = "disk" if config.num_clients > DISK_STATE_ABOVE else "context"
    if kind == "disk":
        root = config.method.client_state_dir or str(Path(config.output_dir) / config.name / "client-state")
        return DiskStateStore(root)
    return ContextStateStore(context)


def partition_id(context: Context, config: RunConfig) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError("this SuperNode has no 'partition-id' in its --node-config")
    pid = int(node_config["partition-id"])
    partitions = int(node_config.get("num-partitions", config.num_clients))
    if partitions != config.num_clients:
        raise ConfigError(
            f"SuperNode says num-partitions={partitions} but the run has num-clients={config.num_clients}; "
            "they must agree so that every node reads its own share of the data"
        )
    return pid


def client_seed(config: RunConfig, server_round: int, pid: int) -> int:
    return config.seed * 1_000_003 + server_round * 10_007 + pid


class ClientRound:
    """One message's work on this node: the model set to the global adapter, plus this client's own parts."""

    def __init__(self, message: Message, context: Context, bound: RunConfig | None) -> None:
        self.config = resolve_config(context, bound)
        self.workspace: Workspace = get_workspace(self.config)
        self.pid = partition_id(context, self.config)
        self.flags = dict(message.content["config"])
        self.store = state_store(self.config, context)
        self.client_key = str(self.pid)
        self.workspace.load_global(record_to_state(message.content["arrays"]))
        if self.flags.get("local-b"):
            own = self.store.load(self.client_key, LOCAL_ADAPTER)
            if own is not None:  # first participation: B = 0 (and the initial head) from the initial adapter
                load_adapter_state(self.workspace.model, own, strict=False)

    def local_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What stays on this client: its B side (LoRA B, VeRA λ_b), and its head when the head is local."""
        return select_roles(state, "B", "head") if self.flags.get("local-head") else select_roles(state, "B")

    def upload(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        roles = [role for role, flag in (("A", "upload-a"), ("B", "upload-b")) if self.flags.get(flag, True)]
        if self.flags.get("upload-head", True) and self.config.lora.train_head:
            roles.append("head")
        return slice_rank(select_roles(state, *roles), self.rank)  # a rank-r_k client sends r_k components

    @property
    def rank(self) -> int:
        return client_rank(self.config.lora.client_ranks, self.pid, self.config.lora.r)


def make_client_app(bound_config: RunConfig | None = None) -> ClientApp:
    """A ClientApp; ``bound_config`` fixes the run config (tests, in-process simulation)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        job, seed = start_train(message, context, bound_config)
        config, model = job.config, job.workspace.model
        started = time.perf_counter()
        dp_metrics: dict[str, float] = {}
        projected: dict[str, torch.Tensor] = {}
        if config.dp.sample_level:
            try:
                result, dp_metrics = _train_private(job, seed)
            except PrivacyBudgetExceeded as refusal:
                return _refusal(message, job, str(refusal))
        elif job.flags.get("fed-galore"):
            # Full base weights on the round's shared basis; only down(ΔW) per layer (and the head) go up.
            result, projected = fed_galore_client_train(
                model,
                job.workspace.client_train_loader(job.pid, seed),
                config.train,
                config.galore,
                fed_galore_modules(config.galore, config.lora.target_modules),
                basis_seed=int(job.flags["galore-seed"]),
                server_round=int(job.flags["server-round"]),
                seed=seed,
            )
        else:
            result = train_local(
                model,
                job.workspace.client_train_loader(job.pid, seed),
                config.train,
                config.optimizer,
                seed=seed,
                galore=config.galore,
            )
        elapsed = time.perf_counter() - started
        return finish_train(message, job, adapter_state(model), result, elapsed, dp_metrics, projected)

    @app.evaluate()
    def evaluate_on_validation(message: Message, context: Context) -> Message:
        """The model this client would use (global, or with its own B for FedSA) on its validation split."""
        job = ClientRound(message, context, bound_config)
        workspace = job.workspace
        result = evaluate(workspace.model, workspace.client_validation_loader(job.pid), workspace.task.num_labels)
        values = {
            "num-examples": result.num_examples,
            "eval-loss": result.loss if result.num_examples else 0.0,
            "eval-accuracy": result.accuracy if result.num_examples else 0.0,
            "eval-f1": result.macro_f1 if result.num_examples else 0.0,
        }
        if job.flags.get("local-b"):
            values["personalization-gap"] = _personalization_gap(job)
        if job.flags.get("eval-global-test"):
            test = evaluate(workspace.model, workspace.test_loader(), workspace.task.num_labels)
            values.update({"test-accuracy": test.accuracy, "test-f1": test.macro_f1, "test-loss": test.loss})
        return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=message)

    return app


def start_train(message: Message, context: Context, bound: RunConfig | None) -> tuple[ClientRound, int]:
    """Set the shared model to this client's starting adapter and mark what trains; returns the job and seed."""
    job = ClientRound(message, context, bound)
    config, model = job.config, job.workspace.model
    set_trainable(
        model,
        lora_a=bool(job.flags.get("train-a", True)),
        lora_b=bool(job.flags.get("train-b", True)),
        head=config.lora.train_head,
    )
    if job.rank < config.lora.r:  # heterogeneous ranks: this client's adapter is the leading r_k components
        restrict_rank(model, job.rank)
    return job, client_seed(config, int(job.flags["server-round"]), job.pid)


def finish_train(
    message: Message,
    job: ClientRound,
    state: dict[str, torch.Tensor],
    result: TrainResult,
    elapsed: float,
    extra_metrics: dict[str, float] | None = None,
    projected: dict[str, torch.Tensor] | None = None,
) -> Message:
    """The reply for a trained adapter ``state``: keep this client's own parts, upload the rest."""
    if job.flags.get("local-b"):
        job.store.save(job.client_key, LOCAL_ADAPTER, job.local_keys(state))
        job.store.save(job.client_key, LAST_TRAINED_A, select_roles(state, "A"))
    upload = job.upload(state)
    if projected:
        upload.update({f"{layer}{PROJECTED_SUFFIX}": low for layer, low in projected.items()})
    metrics = {
        "num-examples": result.dataset_size,
        "train-loss": result.loss,
        "num-steps": result.num_steps,
        "train-time": elapsed,
        "partition-id": job.pid,
        **(extra_metrics or {}),
    }
    content = RecordDict({"arrays": state_to_record(upload), "metrics": MetricRecord(metrics)})
    if job.flags.get("check-shared-a"):
        content["client-info"] = ConfigRecord({"a-checksum": a_checksum(state)})
    return Message(content, reply_to=message)


def batched_training_applies(config: RunConfig, flags: dict) -> bool:
    """Rounds the batched engine covers: LoRA training with AdamW or SGD, plain or DP-SGD (not GaLore or
    federated GaLore)."""
    return config.optimizer in ("adamw", "sgd") and not flags.get("fed-galore")


def train_batch(messages: list[Message], contexts: list[Context], bound: RunConfig | None) -> list[Message]:
    """Train several clients' messages together on the shared base (``fedlowrank.engine``); the replies are
    the ones ``train`` would give (refusals included). Falls back to one-by-one training where the engine
    does not apply."""
    from fedlowrank.engine import ClientJob, PrivateJob, train_batched

    config = resolve_config(contexts[0], bound)
    if not batched_training_applies(config, dict(messages[0].content["config"])):
        app = make_client_app(bound)
        return [app(message, context) for message, context in zip(messages, contexts, strict=True)]
    replies: dict[int, Message] = {}
    jobs, work = {}, {}
    for index, (message, context) in enumerate(zip(messages, contexts, strict=True)):
        job, seed = start_train(message, context, bound)  # sets the shared model to this client's start
        start = adapter_state(job.workspace.model)  # on the CPU until its wave is stacked on the device
        if config.dp.sample_level:
            plan, accountant = _private_plan(job)
            try:
                ensure_within_budget(accountant, plan)
            except PrivacyBudgetExceeded as refusal:
                replies[index] = _refusal(message, job, str(refusal))
                continue
            private = PrivateJob(
                job.workspace.client_train_dataset(job.pid),
                job.workspace.collator,
                plan,
                accountant,
                config.dp.max_grad_norm,
            )
            work[index] = ClientJob(start, seed=seed, private=private)
        else:
            work[index] = ClientJob(start, job.workspace.client_train_loader(job.pid, seed), seed)
        jobs[index] = job
    if work:
        started = time.perf_counter()
        trained = train_batched(
            next(iter(jobs.values())).workspace.model,
            list(work.values()),
            config.train,
            config.optimizer,
            max_tokens=engine_max_tokens(config),
        )
        elapsed = (time.perf_counter() - started) / len(work)  # the wave's time, shared out
        for index, (state, result) in zip(work, trained, strict=True):
            job = jobs[index]
            private = work[index].private
            extra = _private_finish(job, private.plan, private.accountant, result) if private else {}
            replies[index] = finish_train(messages[index], job, state, result, elapsed, extra)
    return [replies[index] for index in range(len(messages))]


def engine_max_tokens(config: RunConfig) -> int:
    """The batched engine's chunk size in padded tokens: ``engine-max-tokens``, or by device when 0 (small
    chunks stay in a CPU's caches: 4,096 tokens ran 4-5x faster than one pass of 60k on 2 cores; a GPU
    wants large ones)."""
    if config.engine_max_tokens > 0:
        return config.engine_max_tokens
    return 32768 if pick_device(config.device).type == "cuda" else 4096


def _private_plan(job: ClientRound) -> tuple[ClientDPPlan, PrivacyAccountant]:
    """This client's σ plan (fixed at its first round) and its accountant, from its persistent state."""
    config = job.config
    saved = job.store.load(job.client_key, DP_STATE) or {}
    accountant = PrivacyAccountant.from_tensor(saved.get("history"), config.dp.accountant)
    plan = plan_client(
        dataset_size=len(job.workspace.client_train_dataset(job.pid)),
        batch_size=config.train.batch_size,
        local_steps=config.train.local_steps,
        local_epochs=config.train.local_epochs,
        num_rounds=config.num_rounds,
        fraction_train=config.fraction_train,
        target_epsilon=config.dp.epsilon,
        delta=config.dp.delta,
        participation=config.dp.participation,
        accountant=config.dp.accountant,
        noise_multiplier=float(saved["plan"][0]) if "plan" in saved else config.dp.noise_multiplier,
    )
    return plan, accountant


def _private_finish(
    job: ClientRound, plan: ClientDPPlan, accountant: PrivacyAccountant, result: DPTrainResult
) -> dict[str, float]:
    """Persist the stepped accountant (never reset) and report the round's privacy metrics."""
    job.store.save(job.client_key, DP_STATE, {"history": accountant.to_tensor(), "plan": plan.as_tensor()})
    return {
        "dp-epsilon": result.epsilon,
        "dp-noise-multiplier": result.noise_multiplier,
        "dp-sample-rate": result.sample_rate,
        "dp-steps-total": float(accountant.steps),
        "dp-empty-batches": result.empty_batches,
        "dp-planned-rounds": plan.planned_rounds,
        "dp-refused": 0,
    }


def _train_private(job: ClientRound, seed: int) -> tuple[DPTrainResult, dict[str, float]]:
    """One round of DP-SGD; the accountant comes from and goes back to this client's persistent state."""
    config, workspace = job.config, job.workspace
    plan, accountant = _private_plan(job)
    result = train_private(
        workspace.model,
        workspace.client_train_dataset(job.pid),
        workspace.collator,
        config.train,
        plan,
        accountant,
        max_grad_norm=config.dp.max_grad_norm,
        engine=config.dp.engine,
        max_physical_batch_size=config.dp.max_physical_batch_size,
        optimizer_kind=config.optimizer,
        seed=seed,
    )
    return result, _private_finish(job, plan, accountant, result)


def _refusal(message: Message, job: ClientRound, reason: str) -> Message:
    """A reply that trains nothing: this client's budget would be exceeded. The server records it."""
    saved = job.store.load(job.client_key, DP_STATE) or {}
    spent = PrivacyAccountant.from_tensor(saved.get("history"), job.config.dp.accountant).epsilon(job.config.dp.delta)
    metrics = {"num-examples": 0, "partition-id": job.pid, "dp-refused": 1, "dp-epsilon": spent}
    content = RecordDict({"metrics": MetricRecord(metrics), "refusal": ConfigRecord({"reason": reason})})
    return Message(content, reply_to=message)


def _personalization_gap(job: ClientRound) -> float:
    """Mean over layers of ‖B_k Ā − B_k A_k‖ / ‖B_k A_k‖ (0 before this client has trained; NaN for VeRA)."""
    own = job.store.load(job.client_key, LOCAL_ADAPTER)
    trained_a = job.store.load(job.client_key, LAST_TRAINED_A)
    if own is None or trained_a is None:
        return 0.0
    current = lora_factors(adapter_state(job.workspace.model))
    if not current:  # VeRA: no factor matrices
        return float("nan")
    b_parts = lora_factors(own, fill_from=current)
    a_parts = lora_factors(trained_a, fill_from=current)
    gaps = [personalization_gap(b_parts[layer].B, current[layer].A, a_parts[layer].A) for layer in current]
    return float(sum(gaps) / len(gaps))


app = make_client_app()
