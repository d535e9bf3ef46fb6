"""Differential privacy for federated LoRA: sample-level DP-SGD in clients (Opacus, or the fused LoRA
path), per-client accounting over the whole run, and user-level DP helpers for the server."""

from fedlowrank.privacy.accounting import (
    ClientDPPlan,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    calibrate_noise,
    plan_client,
    plan_for_run,
    pld_epsilon,
)
from fedlowrank.privacy.dp_sgd import DPTrainResult, train_private
from fedlowrank.privacy.fused import FusedPerSampleGrads, clip_and_noise_

__all__ = [
    "ClientDPPlan",
    "DPTrainResult",
    "FusedPerSampleGrads",
    "PrivacyAccountant",
    "PrivacyBudgetExceeded",
    "calibrate_noise",
    "clip_and_noise_",
    "pld_epsilon",
    "plan_client",
    "plan_for_run",
    "train_private",
]
