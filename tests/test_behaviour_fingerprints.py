"""Every method's behaviour, pinned: fixed-seed two-round federations against fingerprints recorded before the
architecture refactoring (see ``behaviour_fingerprints.py``; re-record only for a deliberate change)."""

from __future__ import annotations

import json

import pytest
import torch
from behaviour_fingerprints import CASES, FINGERPRINTS, OTHER_CPUS, compare, fingerprint, recordings, run_case


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    # CPU dropout masks (MKL's parallel Bernoulli) depend on the thread count: record and check with the same
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("case", list(CASES))
def test_behaviour_matches_the_recorded_fingerprint(case, data_dir, tmp_path):
    current = fingerprint(run_case(case, data_dir, tmp_path))
    report = []
    for where, recorded in recordings(case):  # the primary recording, then other CPUs' (same code, their rounding)
        # ε to 1e-12: Opacus' PRV accountant rounds differently with another BLAS thread count or CPU
        problems = compare(recorded, current, rtol=1e-6, exact_rtol=1e-12)
        if not problems:
            return
        report += [f"against {where}:", *problems]
    raise AssertionError("\n".join(report))


def test_every_recording_on_another_cpu_covers_every_case_with_the_ledger_of_the_primary():
    """A recording from another CPU differs from the primary by rounding only: every case, adapters and metrics
    within 1e-3 (the largest CPU drift seen: 3.1e-4), the ε ledger within 1e-9, bytes and client counts equal:
    a change of behaviour that moves a fingerprint by more than that cannot pass as another CPU's recording."""
    others = json.loads(OTHER_CPUS.read_text())
    primary = json.loads(FINGERPRINTS.read_text())
    for label, entry in others.items():
        assert set(entry["cases"]) == set(CASES), label
        for case in CASES:
            # the ledger to 1e-9: the PRV accountant's own rounding differs between CPUs (seen: 1.4e-12)
            loose = compare(primary[case], entry["cases"][case], rtol=1e-3, exact_rtol=1e-9)
            assert not loose, (label, case, loose)
