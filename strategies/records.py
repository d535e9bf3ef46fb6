"""Conversions between adapter state ``{name: tensor}`` and Flower records (always fp32 on the wire)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    # fp32: ArrayRecord goes through numpy, which has no bfloat16 (flower.md pitfall 1). float64 stays
    # float64 (privacy accountant histories in client state must not lose precision).
    # Sorted keys: Flower's DP wrappers pair reply and broadcast arrays by position.
    return ArrayRecord({k: state[k].detach().to("cpu", _wire_dtype(state[k])) for k in sorted(state)})


def _wire_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def record_bytes(record: ArrayRecord | None) -> int:
    """Bytes as serialized in the message (array payloads plus their keys)."""
    return 0 if record is None else record.count_bytes()
