"""Local trainers: what a client does with a train instruction, one class per way of training.

Every trainer has one interface, used alike by the ClientApp (one client at a time) and by the batched
engine (many at once): ``prepare`` sets the shared model to this client's start and marks what trains, or
refuses the round (a DP client whose budget the round would exceed); ``run`` trains (sequential path);
``engine_data`` gives the batched engine what it needs for this client instead (None: not batchable);
``finish`` keeps this client's own parts and builds its reply. ``trainer_for`` chooses the trainer once, from
the method's spec (its ``trainer`` kind) and the run's privacy settings:

- ``LoRATrainer``: the LoRA factors (and head) with the run's optimizer;
- ``PrivateLoRATrainer``: the same under sample-level DP-SGD, with a per-client accountant that persists in
  the client's state for the whole run;
- ``ProjectedFullWeightTrainer``: full base weights on the round's shared GaLore basis, uploading only the
  projected updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from clients.node import ClientFailure, ClientNode
from fedlowrank.adapters import adapter_state, lora_targets, restrict_rank, set_trainable
from fedlowrank.config import RunConfig
from fedlowrank.engine import PlainData, PrivateData
from fedlowrank.factors import non_finite_keys
from fedlowrank.galore_setup import fed_galore_client_train, fed_galore_modules
from fedlowrank.models import pick_device
from fedlowrank.privacy.accounting import (
    ClientDPPlan,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    ensure_within_budget,
    plan_for_run,
)
from fedlowrank.privacy.dp_sgd import train_private
from fedlowrank.protocol import (
    LORA_TRAINER,
    PROJECTED_FULL_WEIGHTS_TRAINER,
    PROJECTED_SUFFIX,
    PrivacyReport,
    Refusal,
    TrainInstruction,
    TrainReply,
    a_checksum,
)
from fedlowrank.training import TrainResult, train_local

DP_STATE = "dp-accountant"  # DP-SGD: this client's accountant history and its σ plan, for the whole run


@dataclass
class PreparedRound:
    node: ClientNode
    instruction: TrainInstruction
    seed: int
    plan: ClientDPPlan | None = None  # DP-SGD: this client's σ plan and accountant
    accountant: PrivacyAccountant | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # the trained adapter
    result: Any  # TrainResult, or DPTrainResult
    uploads: dict[str, torch.Tensor] = field(default_factory=dict)  # beyond the adapter (projected updates)
    state_finite: bool = False  # ``state`` is known finite: a batched wave checks all its clients at once


class ClientDivergedError(ClientFailure):
    """Local training produced a non-finite loss or weights: the client reports a failure, not an update."""


def check_converged(local: LocalResult) -> None:
    bad = non_finite_keys(local.uploads if local.state_finite else {**local.state, **local.uploads})
    if bad or not math.isfinite(local.result.loss):
        raise ClientDivergedError(
            f"local training diverged (loss {local.result.loss}, {len(bad)} non-finite tensor(s)): nothing is "
            "uploaded or kept; a smaller train.lr (or train.max-grad-norm) usually fixes it"
        )


class LoRATrainer:
    """The LoRA factors the spec trains (and the head), with the run's optimizer."""

    def prepare(self, node: ClientNode, instruction: TrainInstruction) -> PreparedRound | Refusal:
        spec = instruction.spec
        node.load(instruction.state, spec)
        set_trainable(node.model, lora_a="A" in spec.train, lora_b="B" in spec.train, head=node.config.lora.train_head)
        if node.rank < node.config.lora.r:  # heterogeneous ranks: this client's adapter is the leading r_k components
            restrict_rank(node.model, node.rank)
        return PreparedRound(node, instruction, node.seed(instruction.server_round))

    def run(self, prepared: PreparedRound) -> LocalResult:
        node = prepared.node
        loader = node.workspace.client_train_loader(node.partition_id, prepared.seed)
        config = node.config
        result = train_local(
            node.model, loader, config.train, config.optimizer, seed=prepared.seed, galore=config.galore
        )
        return LocalResult(adapter_state(node.model), result)

    def engine_data(self, prepared: PreparedRound) -> PlainData | PrivateData | None:
        node = prepared.node
        if node.config.optimizer not in ("adamw", "sgd"):  # the engine's optimizers act elementwise; GaLore does not
            return None
        return PlainData(node.workspace.client_train_loader(node.partition_id, prepared.seed))

    def finish(self, prepared: PreparedRound, local: LocalResult, elapsed: float) -> TrainReply:
        node, spec = prepared.node, prepared.instruction.spec
        check_converged(local)  # before anything is kept: a diverged client fails the round, it sends nothing
        node.keep(local.state, spec)
        result: TrainResult = local.result
        return TrainReply(
            partition_id=node.partition_id,
            num_examples=result.dataset_size,
            state={**node.upload(local.state, spec), **local.uploads},
            train_loss=result.loss,
            num_steps=result.num_steps,
            train_time=elapsed,
            privacy=self.privacy_report(prepared, local),
            a_checksum=a_checksum(local.state) if spec.check_shared_a else None,
        )

    def privacy_report(self, prepared: PreparedRound, local: LocalResult) -> PrivacyReport | None:
        return None


class PrivateLoRATrainer(LoRATrainer):
    """DP-SGD on what the spec trains: per-example clipping, noise, Poisson sampling, and an accountant that lives
    in the client's state for the whole run (never reset). A round that would exceed the budget is refused."""

    def prepare(self, node: ClientNode, instruction: TrainInstruction) -> PreparedRound | Refusal:
        prepared = super().prepare(node, instruction)
        assert isinstance(prepared, PreparedRound)
        prepared.plan, prepared.accountant = self._plan(node)
        try:
            ensure_within_budget(prepared.accountant, prepared.plan)
        except PrivacyBudgetExceeded as refusal:
            spent = prepared.accountant.epsilon(node.config.dp.delta)
            return Refusal(node.partition_id, str(refusal), spent)
        return prepared

    @staticmethod
    def _plan(node: ClientNode) -> tuple[ClientDPPlan, PrivacyAccountant]:
        """This client's σ plan (fixed at its first round) and its accountant, from its persistent state."""
        config = node.config
        saved = node.load_state(DP_STATE) or {}
        accountant = PrivacyAccountant.from_tensor(saved.get("history"), config.dp.accountant)
        plan = plan_for_run(
            config,
            len(node.workspace.client_train_dataset(node.partition_id)),
            float(saved["plan"][0]) if "plan" in saved else 0.0,
        )
        return plan, accountant

    def run(self, prepared: PreparedRound) -> LocalResult:
        node, config = prepared.node, prepared.node.config
        result = train_private(
            node.model,
            *node.workspace.client_train_examples(node.partition_id),
            config.dp.local_train(config.train),
            prepared.plan,  # type: ignore[arg-type]
            prepared.accountant,  # type: ignore[arg-type]
            max_grad_norm=config.dp.max_grad_norm,
            engine=config.dp.engine,
            max_physical_batch_size=config.dp.max_physical_batch_size,
            max_tokens=engine_max_tokens(config),
            optimizer_kind=config.optimizer,
            seed=prepared.seed,
            check_budget=False,  # prepare() checked it
        )
        return LocalResult(adapter_state(node.model), result)

    def engine_data(self, prepared: PreparedRound) -> PlainData | PrivateData | None:
        node = prepared.node
        dataset, collate = node.workspace.client_train_examples(node.partition_id)
        return PrivateData(dataset, collate, prepared.plan, prepared.accountant, node.config.dp.max_grad_norm)  # type: ignore[arg-type]

    def privacy_report(self, prepared: PreparedRound, local: LocalResult) -> PrivacyReport:
        """Persist the stepped accountant (never reset) and report the round's privacy."""
        node, plan, accountant = prepared.node, prepared.plan, prepared.accountant
        assert plan is not None and accountant is not None
        node.save_state(DP_STATE, {"history": accountant.to_tensor(), "plan": plan.as_tensor()})
        result = local.result
        return PrivacyReport(
            epsilon=result.epsilon,
            noise_multiplier=result.noise_multiplier,
            sample_rate=result.sample_rate,
            steps_total=accountant.steps,
            empty_batches=result.empty_batches,
            planned_rounds=plan.planned_rounds,
        )


class ProjectedFullWeightTrainer(LoRATrainer):
    """Federated GaLore's client: the base weights under the LoRA layers train in full on the round's Gaussian
    basis (derived from the run seed, the round and the layer, as the server derives it); only their
    projected updates ``down(ΔW)`` (and the head) go up."""

    def run(self, prepared: PreparedRound) -> LocalResult:
        node, config = prepared.node, prepared.node.config
        result, projected = fed_galore_client_train(
            node.model,
            node.workspace.client_train_loader(node.partition_id, prepared.seed),
            config.train,
            config.galore,
            fed_galore_modules(
                config.galore,
                lora_targets(config.model, config.task, config.lora.target_modules, config.trust_remote_code),
            ),
            basis_seed=prepared.instruction.seed,
            server_round=prepared.instruction.server_round,
            seed=prepared.seed,
        )
        uploads = {f"{layer}{PROJECTED_SUFFIX}": low for layer, low in projected.items()}
        return LocalResult(adapter_state(node.model), result, uploads)

    def engine_data(self, prepared: PreparedRound) -> PlainData | PrivateData | None:
        return None


def trainer_for(node: ClientNode, instruction: TrainInstruction) -> LoRATrainer:
    """The trainer of this round, from the instruction's method spec and the run's privacy settings."""
    kind = instruction.spec.trainer
    if kind == PROJECTED_FULL_WEIGHTS_TRAINER:
        return ProjectedFullWeightTrainer()
    if kind == LORA_TRAINER:
        return PrivateLoRATrainer() if node.config.dp.sample_level else LoRATrainer()
    raise ValueError(f"this client has no local trainer {kind!r}")


def train_one(trainer: LoRATrainer, node: ClientNode, instruction: TrainInstruction) -> TrainReply | Refusal:
    """The sequential path: prepare (or refuse), train, finish."""
    prepared = trainer.prepare(node, instruction)
    if isinstance(prepared, Refusal):
        return prepared
    started = time.perf_counter()
    local = trainer.run(prepared)
    return trainer.finish(prepared, local, time.perf_counter() - started)


def engine_max_tokens(config: RunConfig) -> int:
    """Padded tokens per forward chunk of the batched engine and of a DP-SGD client's Poisson batch:
    ``engine-max-tokens``, or by device when 0 (small chunks stay in a CPU's caches: 4,096 tokens ran 4-5x
    faster than one pass of 60k on 2 cores; a GPU wants large ones)."""
    if config.engine_max_tokens > 0:
        return config.engine_max_tokens
    return 32768 if pick_device(config.device).type == "cuda" else 4096
