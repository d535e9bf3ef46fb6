"""Registered clients are cheap: memory and round time with 10,000 registered clients against 100, when 100
train each round (issue 15, scale).

Both federations run FedSA-LoRA with sample-level DP-SGD (each client's B and accountant kept in its own state
on disk) on SST-2, in process (``fedlowrank simulate``'s path), with a 2-layer BERT (hidden 128, random
weights: the cost of a client does not depend on them). Every sampled client takes the same work: two
Poisson batches of expected size 4, whatever its share of the data (~6 examples each with 10,000 registered,
~600 with 100). With 100 registered the same clients train every round; with 10,000 each round samples
mostly clients that have never trained, so each pays its first-use costs (its train/validation split,
tokenization, new state on disk) in every round: the round-time ratio includes them, as a real federation
of that size would. Each federation runs in its own process, and the report gives

- ``partition_seconds``: splitting the training set over the registered clients (flwr-datasets' IID
  partitioner; each client's train/validation split is made only when the client is first sampled);
- ``peak_rss_mb``: the process's peak resident memory (model, data, 10,000 registrations, client state);
- ``round_seconds``: the median train-phase time (configure, train, aggregate) of rounds 2..R.

Nothing is evaluated (``fraction-evaluate = 0``; FedSA's clients evaluate their own adapters).

Prints a table and, last, ``memory_ratio 10000/100: x`` and ``round_time_ratio 10000/100: x`` (targets: at most
1.2, and about 1). Writes ``benchmarks/results/scale/scale-cpu.json`` and ``scale-cpu.md`` with the command.

    python benchmarks/bench_scale.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlowrank.config import RunConfig

REPO = Path(__file__).resolve().parent.parent


def run_config(args: argparse.Namespace, registered: int, output: Path) -> RunConfig:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_engine import small_model_folder

    from fedlowrank.config import RunConfig

    return RunConfig.from_flat(
        {
            "name": f"registered-{registered}",
            "output-dir": str(output),
            "data-dir": args.data_dir,
            "model": small_model_folder(output),
            "dataset": "sst2",
            "strategy": "fedsa",
            "num-clients": registered,
            "fraction-train": args.sampled / registered,
            "fraction-evaluate": 0.0,
            "num-rounds": args.rounds,
            "server-eval-every": 10_000,
            "device": "cpu",
            "seed": 0,
            "data.partitioner": "iid",
            "data.max-test-examples": 64,
            "data.max-length": 64,
            "train.batch-size": 4,
            "train.local-steps": 2,
            "train.lr": 0.05,
            "optimizer": "sgd",
            "dp.epsilon": 8.0,
            "dp.engine": "fused",
        }
    )


def worker(args: argparse.Namespace) -> dict:
    """One federation in this process: partition time, peak memory and the steady round time."""
    import torch

    from fedlowrank.progress import Reporter
    from fedlowrank.runtime import client_partitions, load_run_task
    from simulations.run import run_inprocess

    torch.set_num_threads(args.threads)
    output = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    config = run_config(args, args.worker, output)
    task = load_run_task(config)
    started = time.perf_counter()
    partitions = client_partitions(config, task)
    partition_seconds = time.perf_counter() - started
    del partitions, task  # the run loads its own
    run_inprocess(config, Reporter())
    rows = [json.loads(line) for line in (output / config.name / "metrics.jsonl").open()]
    shutil.rmtree(output, ignore_errors=True)  # 10,000 clients' state folders
    times = [row["train_round_time"] for row in rows if "train_round_time" in row]
    trained = [row.get("clients_trained", 0) for row in rows if "train_round_time" in row]
    return {
        "registered": args.worker,
        "sampled_per_round": statistics.median(trained),
        "partition_seconds": partition_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "round_seconds": statistics.median(times[1:] if len(times) > 1 else times),
        "round_seconds_all": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDLOWRANK_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--registered", default="100,10000", help="comma-separated numbers of registered clients")
    parser.add_argument("--sampled", type=int, default=100, help="clients trained per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "scale")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    counts = [int(n) for n in args.registered.split(",")]
    if min(counts) < args.sampled:
        parser.error(f"--registered {counts}: every federation needs at least --sampled {args.sampled} clients")
    command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    rows = []
    for registered in counts:  # one process each: its peak memory is its own
        child = [sys.executable, __file__, "--worker", str(registered), *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not results:
            sys.exit(f"the federation with {registered} registered clients failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(results[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"# Registered clients are cheap: {args.sampled} sampled per round, FedSA-LoRA + DP-SGD",
        "",
        f"Command: `{command.strip()}`",
        "",
        "| registered | trained per round | partition (s) | peak memory (MB) | round time (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['registered']} | {r['sampled_per_round']:g} | {r['partition_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
        f"{r['round_seconds']:.2f} |"
        for r in rows
    ]
    summary = []
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        label = f"{large['registered']}/{small['registered']}"
        summary = [
            f"memory_ratio {label}: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}",
            f"round_time_ratio {label}: {large['round_seconds'] / small['round_seconds']:.2f}",
        ]
        lines += ["", *summary]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "scale-cpu.md").write_text("\n".join(lines) + "\n")
    (args.output / "scale-cpu.json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=2))
    print("\n".join(lines[4:]))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
