"""Behaviour fingerprints: fixed-seed two-round federations of every method, recorded once and checked forever.

Each case runs a tiny federation (MiniLM, 3 clients on a TREC subset, 3 local steps, 2 rounds) and reduces
its outputs to a fingerprint: per saved adapter tensor (and folded base residual) its float64 norm and its
projection on a fixed random vector, plus every per-round metric that is not a wall-clock time.

``python tests/behaviour_fingerprints.py record`` writes ``tests/data/behaviour_fingerprints.json``;
``tests/test_behaviour_fingerprints.py`` re-runs every case and compares (adapters to 1e-6 relative, the ε
ledger and bytes exactly). It guards refactorings: a change of behaviour must be deliberate and re-recorded.
Re-recorded since, deliberately: FedSA's last-round test metrics (now the plain mean over the clients that score
their own model, no longer weighted by validation-split sizes).

Another CPU's float kernels move a fingerprint by more than 1e-6 (seen: 1.7e-6 to 3.1e-4 relative on a 2-core
AVX-512 Xeon, whose drift also changed with ``MKL_ENABLE_INSTRUCTIONS``; 4e-6 to 2.9e-4 on a 2-core AMD EPYC), so
``behaviour_fingerprints_other_cpus.json`` holds the same cases recorded on other machines from a commit whose run
matched the primary recording on its own machine. A run passes if it matches one recording at the same
tolerances; nothing is loosened. ``python tests/behaviour_fingerprints.py record-cpu LABEL "machine words" COMMIT``
adds one (run it only from such a commit).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

FINGERPRINTS = Path(__file__).resolve().parent / "data" / "behaviour_fingerprints.json"
OTHER_CPUS = FINGERPRINTS.with_name("behaviour_fingerprints_other_cpus.json")  # label -> machine, commit, cases
TIMING_KEYS = ("round_time", "train_round_time", "wall_time")
EXACT_KEYS = ("dp_epsilon_per_client", "dp_epsilon_max", "user_dp_epsilon")  # the ε ledger: equal to the bit
SGD = {"optimizer": "sgd", "train.lr": 0.5}
DP = {"dp.epsilon": 50.0, "dp.noise-multiplier": 0.8, **SGD}
GALORE = {"strategy": "fed-galore", "optimizer": "galore", "galore.projector": "gaussian", "galore.rank": 16}
LORA_METHODS = ("fedit", "fedsa", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora")

CASES: dict[str, dict[str, Any]] = {
    **{method: {"strategy": method} for method in LORA_METHODS},
    **{f"{method}-dp": {"strategy": method, **DP} for method in LORA_METHODS},
    "ffa-dp-fused": {"strategy": "ffa", **DP, "dp.engine": "fused"},
    "fed-galore": dict(GALORE),
    # SGD: AdamW's first step g/|g| turns rounding noise (which the batched engine's mixed shapes pick up from
    # the BLAS) into ±lr steps, more than the 1e-6 this check allows
    "fedit-batched": {"strategy": "fedit", "engine": "batched", **SGD},
    "fedsa-batched-waves": {"strategy": "fedsa", "engine": "batched", "engine-wave-size": 2, **SGD},
    "ffa-dp-batched": {"strategy": "ffa", **DP, "engine": "batched"},
    "fedsvd-user-dp": {
        "strategy": "fedsvd",
        "weighting": "uniform",
        "dp.user-noise-multiplier": 0.5,
        "dp.user-clip-norm": 0.5,
    },
    "lora-fair-user-dp": {
        "strategy": "lora-fair",
        "weighting": "uniform",
        "dp.user-noise-multiplier": 0.5,
        "dp.user-clip-norm": 0.5,
    },
    "flexlora-ranks": {"strategy": "flexlora", "lora.client-ranks": "2,4,8"},
}


def base_settings(data_dir: Path, output_dir: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "output-dir": str(output_dir),
        "data-dir": str(data_dir),
        "num-clients": 3,
        "num-rounds": 2,
        "data.max-train-examples": 240,
        "data.max-test-examples": 96,
        "data.max-length": 32,
        "data.min-partition-size": 5,
        "train.local-steps": 3,
        "train.batch-size": 16,
    }


def run_case(name: str, data_dir: Path, output_dir: Path) -> Path:
    """Run one case through the in-process simulator (the code path of ``fedlowrank simulate``)."""
    from fedlowrank.config import RunConfig
    from simulations.run import run_inprocess

    flat = {**base_settings(data_dir, output_dir, name), **CASES[name]}
    run_inprocess(RunConfig.from_flat(flat))
    return output_dir / name


def _projection(name: str, tensor: torch.Tensor) -> float:
    seed = int.from_bytes(name.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
    direction = torch.randn(tensor.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return float(direction @ tensor.reshape(-1).to(torch.float64))


def fingerprint(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted((run_dir / "adapter").glob("*.safetensors")):
        tensors.update({f"{file.stem}:{key}": value for key, value in load_file(str(file)).items()})
    # A LoRA layer enters through its product B·A: SVD-based methods (FedSVD, FlexLoRA) fix factors only up to
    # the signs of singular vectors, which float rounding may flip; the product (and training) does not care.
    for key_a in [key for key in tensors if ".lora_A." in key]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        product = tensors.pop(key_b).to(torch.float64) @ tensors.pop(key_a).to(torch.float64)
        tensors[key_a.replace(".lora_A.", ".lora_BA.")] = product
    adapter = {
        key: [float(value.to(torch.float64).norm()), _projection(key, value)] for key, value in sorted(tensors.items())
    }
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]
    return {"adapter": adapter, "metrics": metrics}


def compare(
    recorded: dict[str, Any], current: dict[str, Any], rtol: float = 1e-6, exact_rtol: float = 0.0
) -> list[str]:
    """Differences between two fingerprints (empty: the same behaviour). Adapters and metrics to ``rtol``; the ε
    ledger, bytes and client counts to ``exact_rtol`` (0: to the bit)."""
    problems = []
    if set(recorded["adapter"]) != set(current["adapter"]):
        problems.append(f"adapter tensors differ: {sorted(set(recorded['adapter']) ^ set(current['adapter']))}")
    else:
        old = torch.tensor([v for key in sorted(recorded["adapter"]) for v in recorded["adapter"][key]])
        new = torch.tensor([v for key in sorted(current["adapter"]) for v in current["adapter"][key]])
        relative = float((old - new).norm() / old.norm().clamp(min=1e-30))
        if relative > rtol:
            problems.append(f"adapter fingerprint moved by {relative:.2e} (relative) > {rtol:.0e}")
    if len(recorded["metrics"]) != len(current["metrics"]):
        problems.append(f"{len(recorded['metrics'])} rounds recorded, {len(current['metrics'])} now")
    for index, (old_row, new_row) in enumerate(zip(recorded["metrics"], current["metrics"], strict=False)):
        for key, old_value in old_row.items():
            if key not in new_row:
                problems.append(f"round {index + 1}: metric {key!r} missing")
                continue
            exact = key in EXACT_KEYS or key.startswith("bytes_") or key.startswith("clients_")
            # A bias metric is ‖mean(B)·mean(A) − mean(B·A)‖ / ‖mean(B·A)‖: a rounding change of δ (relative) in the
            # factors moves it by ~δ in absolute terms, whatever its size, so it is compared to rtol absolutely
            # (seen: float32 matmuls on another CPU moved a 6e-4 bias by 1.8e-9).
            absolute = rtol if key.startswith("bias_") and not exact else 0.0
            if not _close(old_value, new_row[key], exact_rtol if exact else rtol, absolute):
                problems.append(f"round {index + 1}: {key} was {old_value!r}, now {new_row[key]!r}")
    return problems


def _close(old: Any, new: Any, rtol: float, atol: float = 0.0) -> bool:
    if isinstance(old, dict):
        same_keys = isinstance(new, dict) and set(old) == set(new)
        return same_keys and all(_close(old[k], new[k], rtol, atol) for k in old)
    if isinstance(old, list):
        same_length = isinstance(new, list) and len(old) == len(new)
        return same_length and all(_close(a, b, rtol, atol) for a, b in zip(old, new, strict=True))
    if isinstance(old, float) and isinstance(new, int | float):
        if math.isnan(old):
            return math.isnan(new)
        # atol: bias metrics of "exact" methods are rounding noise (1e-8 .. 1e-16), not behaviour
        if rtol == 0:
            return old == new
        return abs(old - new) <= rtol * abs(old) + max(atol, 1e-9 if rtol > 1e-9 else 0.0)
    return old == new


def recordings(case: str) -> list[tuple[str, dict[str, Any]]]:
    """The case's recordings, the primary first, then those made on other CPUs: (where, fingerprint)."""
    found = [("primary", json.loads(FINGERPRINTS.read_text())[case])]
    if OTHER_CPUS.is_file():
        for label, entry in sorted(json.loads(OTHER_CPUS.read_text()).items()):
            if case in entry["cases"]:
                found.append((f"{label} ({entry['machine']}; {entry['recorded_from']})", entry["cases"][case]))
    return found


def record_cpu(data_dir: Path, output_dir: Path, label: str, machine: str, commit: str) -> None:
    entries = json.loads(OTHER_CPUS.read_text()) if OTHER_CPUS.is_file() else {}
    cases = {name: fingerprint(run_case(name, data_dir, output_dir)) for name in CASES}
    entries[label] = {"machine": machine, "recorded_from": commit, "cases": cases}
    OTHER_CPUS.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def record(data_dir: Path, output_dir: Path, names: list[str] | None = None) -> None:
    recorded = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {}
    for name in names or list(CASES):
        recorded[name] = fingerprint(run_case(name, data_dir, output_dir))
        print(f"recorded {name}", flush=True)
    FINGERPRINTS.parent.mkdir(parents=True, exist_ok=True)
    FINGERPRINTS.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # python tests/behaviour_fingerprints.py record [CASE ...] | record-cpu LABEL MACHINE COMMIT
    import os
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    data = Path(os.environ.get("FEDLOWRANK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    torch.set_num_threads(2)  # as the test: CPU dropout masks depend on the thread count
    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:2] == ["record"]:
            record(data, Path(tmp), sys.argv[2:] or None)
        elif sys.argv[1:2] == ["record-cpu"] and len(sys.argv) == 5:
            record_cpu(data, Path(tmp), *sys.argv[2:5])
        else:
            raise SystemExit(
                "usage: python tests/behaviour_fingerprints.py record [CASE ...]\n"
                '       python tests/behaviour_fingerprints.py record-cpu LABEL "machine words" COMMIT'
            )
