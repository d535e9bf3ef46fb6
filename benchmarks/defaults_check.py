"""Do the default settings learn on text tasks of different shapes? (issue 13: defaults that transfer)

Runs the shipped default configuration (`simulations/default.toml`: MiniLM, AdamW at the default learning
rate, 10 clients at Dirichlet 0.5 for FedIT, 4 rounds / epochs), changing only the dataset, centrally
(`fedlowrank train`) and federated with FedIT (`fedlowrank simulate`), on:

- ``trec``: TREC, 6 coarse question classes, 5,452 training questions;
- ``trec-fine``: the same questions, 50 fine classes (many classes, a few examples each);
- ``sst2-2k``: SST-2 sentiment, 2 classes, a 2,000-example subset of short phrases (the small-data shape on
  which the issue saw a 5e-3 default collapse).

Each cell reports the final test accuracy, the majority-class share of the test split, and the run's own
``learning_warning`` (collapse or no better than the label prior). Nothing is tuned here and no test split
chooses anything: these are the defaults as shipped. Writes ``benchmarks/results/defaults/defaults.md`` and
``defaults.json`` (with the commands); a cell already in ``defaults.json`` is not run again, so the check can
be done in several sittings:

    python benchmarks/defaults_check.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = {
    "trec": {"dataset": "trec"},
    "trec-fine": {"dataset": "trec", "data.label-column": "fine_label", "data.unseen-test-labels": "keep"},
    "sst2-2k": {"dataset": "sst2", "data.max-train-examples": 2000},
}
MODES = ("centralized", "fedit")


def run_cell(task: str, mode: str, args: argparse.Namespace) -> dict:
    from collections import Counter

    from fedlowrank.centralized import train_centralized
    from fedlowrank.config import RunConfig
    from fedlowrank.progress import Reporter
    from fedlowrank.runtime import load_run_task
    from simulations.run import run_inprocess

    config = RunConfig.from_toml(REPO / "simulations" / "default.toml")
    overrides = {"name": f"{task}-{mode}", "output-dir": str(args.output / "runs"), "overwrite": True}
    overrides.update({"data-dir": args.data_dir, "seed": args.seed, **TASKS[task]})
    for key, value in overrides.items():
        config.set(key, value)
    config.validate()
    started = time.perf_counter()
    summary = train_centralized(config, Reporter()) if mode == "centralized" else run_inprocess(config, Reporter())
    test = load_run_task(config).test
    counts = Counter(test[config.data.label_column])
    return {
        "task": task,
        "mode": mode,
        "lr": config.train.lr,
        "test_accuracy": summary["test_accuracy"],
        "majority_share": max(counts.values()) / sum(counts.values()),
        "classes": len(counts),
        "learning_warning": summary.get("learning_warning"),
        "seconds": time.perf_counter() - started,
    }


def write_table(rows: list[dict], commands: list[str], output: Path) -> Path:
    lines = [
        "# Do the defaults learn? (MiniLM, `simulations/default.toml` as shipped; only the dataset changes)",
        "",
        "Commands (cells already in `defaults.json` are kept, so several invocations add up):",
        "",
        *(f"    {command}" for command in commands),
        "",
        "| task | classes | mode | lr | test accuracy | majority class | learned? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        learned = "no (below)" if r["learning_warning"] else "yes"
        lines.append(
            f"| {r['task']} | {r['classes']} | {r['mode']} | {r['lr']:g} | {r['test_accuracy']:.3f} | "
            f"{r['majority_share']:.3f} | {learned} |"
        )
    warned = [r for r in rows if r["learning_warning"]]
    if warned:
        lines += ["", "The runs' own warnings:", ""]
        lines += [f"- {r['task']} / {r['mode']}: {r['learning_warning']}" for r in warned]
    path = output / "defaults.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDLOWRANK_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "defaults")
    args = parser.parse_args()
    tasks, modes = args.tasks.split(","), args.modes.split(",")
    unknown = sorted((set(tasks) - set(TASKS)) | (set(modes) - set(MODES)))
    if unknown:
        parser.error(f"unknown task(s) or mode(s) {unknown}; tasks: {', '.join(TASKS)}; modes: {', '.join(MODES)}")
    args.output.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/defaults_check.py " + " ".join(sys.argv[1:])).strip()
    saved = args.output / "defaults.json"
    previous = json.loads(saved.read_text()) if saved.is_file() else {"commands": [], "rows": []}
    rows = previous["rows"]  # cells finished by an earlier invocation are kept, not re-run
    commands = [*previous.get("commands", []), command]
    for task in tasks:
        for mode in modes:
            if any(r["task"] == task and r["mode"] == mode and r.get("seed") == args.seed for r in rows):
                continue
            rows.append({**run_cell(task, mode, args), "seed": args.seed})
            print(json.dumps(rows[-1]), flush=True)
            saved.write_text(json.dumps({"commands": commands, "rows": rows}, indent=2))
    print(f"wrote {write_table(rows, commands, args.output)}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
