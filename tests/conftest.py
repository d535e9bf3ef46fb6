"""Shared fixtures: the real datasets from ../shared/data (or $FEDLOWRANK_DATA) and real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _data_dir() -> Path:
    path = Path(os.environ.get("FEDLOWRANK_DATA") or REPO.parent / "shared" / "data").resolve()
    if not (path / "trec" / "train.csv").is_file():
        raise RuntimeError(f"real datasets not found at {path}: set FEDLOWRANK_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture()
def tiny_config(data_dir, tmp_path):
    """A small but real run: MiniLM on a TREC subset, a few local steps."""
    from behaviour_fingerprints import base_settings

    from fedlowrank.config import RunConfig

    def make(**overrides):
        flat = base_settings(data_dir, tmp_path / "runs", "tiny")  # the fingerprints' frozen tiny run
        flat.update(overrides)
        return RunConfig.from_flat(flat)

    return make


def fixed_dp_plan(dataset_size, sigma, *, batch_size=8, local_steps=3, budget=50.0):
    """One client's DP plan at a fixed σ for one round (tests that exercise the training loop itself)."""
    from fedlowrank.privacy.accounting import plan_client

    return plan_client(
        dataset_size=dataset_size,
        batch_size=batch_size,
        local_steps=local_steps,
        local_epochs=1,
        num_rounds=1,
        fraction_train=1.0,
        target_epsilon=budget,
        delta=1e-5,
        noise_multiplier=sigma,
    )
