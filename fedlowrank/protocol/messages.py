"""What the server and the clients say to each other: typed instructions and replies, free of Flower.

``strategies/`` (the server) and ``clients/`` (the ClientApp) never import each other; both speak through
this module. A method's :class:`MethodSpec` travels in every instruction, so a client learns from the message
itself what to train, what to upload and what to keep, whatever method the server runs. The Flower encoding
of these types is :mod:`fedlowrank.protocol.flower`, the only Flower import in ``fedlowrank/``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

from fedlowrank.factors import key_role

__all__ = [
    "FACTOR_SIDES",
    "LORA_TRAINER",
    "PROJECTED_FULL_WEIGHTS_TRAINER",
    "PROJECTED_SUFFIX",
    "EvaluateInstruction",
    "EvaluateReply",
    "MalformedMessage",
    "MethodSpec",
    "PrivacyReport",
    "Refusal",
    "TrainInstruction",
    "TrainReply",
    "check_run_key",
    "a_checksum",
    "cohort_of",
]

# Local trainers a method's clients can use (clients/trainers.py implements them). DP-SGD is not a trainer
# kind: the run's [dp] settings turn the "lora" trainer private.
LORA_TRAINER = "lora"  # the LoRA factors (and the head) with the run's optimizer
PROJECTED_FULL_WEIGHTS_TRAINER = "projected-full-weights"  # base weights on a round's shared GaLore basis
TRAINERS = (LORA_TRAINER, PROJECTED_FULL_WEIGHTS_TRAINER)

# Keys of the projected full-weight updates a "projected-full-weights" client uploads: "<layer>.projected".
PROJECTED_SUFFIX = ".projected"


FACTOR_SIDES = ("A", "B")


def cohort_of(client: int, num_cohorts: int) -> int:
    """The cohort node that hosts virtual client ``client`` when ``num_cohorts`` nodes host them all: client k on
    node k mod N. Fixed for a run, so a client's state (its own B, its DP accountant) never moves, and every node
    hosts ⌈K/N⌉ or ⌊K/N⌋ clients."""
    return client % num_cohorts


@dataclass(frozen=True)
class MethodSpec:
    """What a method's clients train, send and keep, and what the server sends down.

    Sides are adapter roles (``fedlowrank.adapters.key_role``): "A" (LoRA A, VeRA λ_d) and "B" (LoRA B, VeRA
    λ_b). The head (the classifier) trains when the run's ``lora.train-head`` says so; it goes up and down
    unless it is local.
    """

    trainer: str = LORA_TRAINER
    train: tuple[str, ...] = FACTOR_SIDES  # the sides clients train
    upload: tuple[str, ...] = FACTOR_SIDES  # the sides they send up
    download: tuple[str, ...] = FACTOR_SIDES  # the sides the server sends down
    # Each client keeps its own B between rounds (personalisation), and its own head when ``local_head``.
    local_b: bool = False
    local_head: bool = False
    # The frozen A must be bit-identical everywhere: clients send its checksum, the server checks.
    check_shared_a: bool = False
    # Server side only. Clients may train rank r_k <= r (``lora.client-ranks``): the math takes zero-padded factors.
    heterogeneous_ranks: bool = False

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"unknown local trainer {self.trainer!r}; known: {', '.join(TRAINERS)}")
        for name in ("train", "upload", "download"):
            sides = tuple(getattr(self, name))
            if not set(sides) <= set(FACTOR_SIDES):
                raise ValueError(f"MethodSpec.{name}: sides are 'A' and 'B', got {sides}")
            object.__setattr__(self, name, sides)

    @property
    def personalized(self) -> bool:
        """No single global model: each client evaluates its own (global parts plus what it keeps)."""
        return self.local_b

    @property
    def trains_factors(self) -> bool:
        return self.trainer == LORA_TRAINER

    def uploaded_roles(self, train_head: bool) -> tuple[str, ...]:
        return (*self.upload, "head") if train_head and not self.local_head else self.upload

    def downloaded_roles(self) -> tuple[str, ...]:
        return self.download if self.local_head else (*self.download, "head")

    def kept_roles(self) -> tuple[str, ...]:
        if not self.local_b:
            return ()
        return ("B", "head") if self.local_head else ("B",)


_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_key(key: str) -> str:
    """A run key names the run's folder in a node's client state: one plain path component (or "": none)."""
    if key and not _RUN_KEY.fullmatch(key):
        raise ValueError(f"bad run key {key[:40]!r}: letters, digits, '.', '_' and '-' only (at most 128)")
    return key


@dataclass(frozen=True)
class TrainInstruction:
    server_round: int
    spec: MethodSpec
    state: dict[str, torch.Tensor]  # the broadcast: adapter tensors and "<layer>.residual" entries
    seed: int = 0  # the run seed (a trainer may derive shared randomness from it, e.g. a round's basis)
    # The run's own folder in a node's client state: a node's folder outlives runs, and only a resumed run may
    # read what an earlier process of the same run left ("": the folder itself, as runs made before keys did)
    run_key: str = ""
    # Clients the server knows trained earlier in this run (runs whose clients keep state: a DP accountant, an
    # own B). Such a client that finds no state of its own has lost it, and must not start it over.
    trained_before: frozenset[int] = frozenset()


@dataclass(frozen=True)
class EvaluateInstruction:
    server_round: int
    spec: MethodSpec
    state: dict[str, torch.Tensor]
    test_set: bool = False  # also score the global test set (personalised methods, last round)
    run_key: str = ""  # as in TrainInstruction (a personalised client evaluates with its own state)
    trained_before: frozenset[int] = frozenset()  # as in TrainInstruction


@dataclass(frozen=True)
class PrivacyReport:
    """A DP-SGD client's account after a round (ε is cumulative over every round it joined)."""

    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps_total: int
    empty_batches: int
    planned_rounds: int


@dataclass(frozen=True)
class TrainReply:
    partition_id: int
    num_examples: int
    state: dict[str, torch.Tensor]  # what the client uploads
    train_loss: float
    num_steps: int
    train_time: float
    privacy: PrivacyReport | None = None
    a_checksum: str | None = None  # when the spec asks for it
    state_finite: bool = False  # ``state`` is known finite (checked as a round's replies were read together)


@dataclass(frozen=True)
class Refusal:
    """A DP client whose next round would exceed its budget: it trains nothing and says so."""

    partition_id: int
    reason: str
    epsilon: float  # spent so far


@dataclass(frozen=True)
class EvaluateReply:
    partition_id: int
    num_examples: int  # of the client's validation split
    loss: float
    accuracy: float
    f1: float
    personalization_gap: float | None = None
    test: dict[str, float] = field(default_factory=dict)  # EvalResult.as_dict() on the global test set


class MalformedMessage(ValueError):
    """A message that does not follow this protocol; the text says what is wrong."""


def a_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the bytes of every A-side and frozen shared tensor (LoRA A; VeRA λ_d and projections)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if key_role(k) in ("A", "frozen")):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
