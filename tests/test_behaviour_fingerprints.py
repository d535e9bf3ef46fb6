"""Every method's behaviour, pinned: fixed-seed two-round federations against fingerprints recorded before the
architecture refactoring (see ``behaviour_fingerprints.py``; re-record only for a deliberate change)."""

from __future__ import annotations

import json

import pytest
import torch
from behaviour_fingerprints import CASES, FINGERPRINTS, compare, fingerprint, run_case


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    # CPU dropout masks (MKL's parallel Bernoulli) depend on the thread count: record and check with the same
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("case", list(CASES))
def test_behaviour_matches_the_recorded_fingerprint(case, data_dir, tmp_path):
    recorded = json.loads(FINGERPRINTS.read_text())[case]
    current = fingerprint(run_case(case, data_dir, tmp_path))
    # ε to 1e-12: Opacus' PRV accountant rounds differently with another BLAS thread count or CPU
    problems = compare(recorded, current, rtol=1e-6, exact_rtol=1e-12)
    assert not problems, "\n".join(problems)
