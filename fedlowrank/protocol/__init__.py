"""The message protocol between the server (``strategies/``) and the clients (``clients/``).

``messages`` holds the typed instructions and replies (Flower-free); ``flower`` encodes them as Flower records.
"""

from fedlowrank.protocol.messages import (
    LORA_TRAINER,
    PROJECTED_FULL_WEIGHTS_TRAINER,
    PROJECTED_SUFFIX,
    EvaluateInstruction,
    EvaluateReply,
    MalformedMessage,
    MethodSpec,
    PrivacyReport,
    Refusal,
    TrainInstruction,
    TrainReply,
    a_checksum,
)

__all__ = [
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
    "a_checksum",
]
