"""Many clients on one device: the batched multi-client LoRA trainer (see ``batched.py``)."""

from fedlowrank.engine.batched import ClientJob, PlainData, PrivateData, train_batched

__all__ = ["ClientJob", "PlainData", "PrivateData", "train_batched"]
