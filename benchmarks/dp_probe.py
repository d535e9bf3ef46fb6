"""Can one client learn under DP-SGD? One client's local training (the code path of a DP-SGD client:
``train_private`` with Opacus' DPOptimizer), at a fixed noise multiplier σ, then its accuracy on the clients'
validation splits (never the test split).

A diagnostic for sizing the privacy sweep: σ near 0 checks that clipping alone still learns (the mechanism is
sound), then real σ values show whether the noise leaves anything to learn at that data size, batch and step
count (client 0 of 2 IID clients over the whole training set by default). ``--head-only`` freezes the LoRA
factors to see whether the noise on them is what hurts.

    python benchmarks/dp_probe.py --sigma 1e-6 --lr 5e-3 --optimizer adamw --batch 64
    python benchmarks/dp_probe.py --sigma 1.1 --lr 2e-3 --optimizer adamw --batch 256 \
        --set dataset=sst2 --set data.max-train-examples=12000 --set data.max-length=48

Prints one JSON line and appends it to ``benchmarks/results/privacy-sweep/probes.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from fedlowrank.config import RunConfig
from fedlowrank.privacy.accounting import PrivacyAccountant, plan_client
from fedlowrank.privacy.dp_sgd import train_private
from fedlowrank.runtime import get_workspace

ROOT = Path(__file__).resolve().parent.parent
# the sweep's optimizer and clipping, on client 0 of 2 IID clients over the whole training set
BASE = ["num-clients=2", "data.partitioner='iid'", "data.max-train-examples=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=float, required=True, help="noise multiplier (fixed, not calibrated)")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--batch", type=int, default=64, help="expected Poisson batch size")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--engine", choices=("fused", "hooks"), default="fused")
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per piece (0: whole batches)")
    parser.add_argument("--head-only", action="store_true", help="freeze the LoRA factors")
    parser.add_argument("--config", default=str(ROOT / "simulations" / "privacy_sweep.toml"))
    parser.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    overrides = [f"train.lr={args.lr}", f"optimizer='{args.optimizer}'", f"train.batch-size={args.batch}"]
    data_dir = os.environ.get("FEDLOWRANK_DATA", str(ROOT.parent / "shared" / "data"))
    config = RunConfig.from_toml(args.config, [f"data-dir='{data_dir}'", *BASE, *args.set, *overrides])
    workspace = get_workspace(config)
    workspace.load_global({})
    if args.head_only:
        for name, param in workspace.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)
    data = workspace.client_train_dataset(0)
    plan = plan_client(
        dataset_size=len(data), batch_size=args.batch, local_steps=0, local_epochs=args.epochs, num_rounds=1,
        fraction_train=1.0, target_epsilon=1e9, delta=config.dp.delta, accountant="rdp",
        noise_multiplier=args.sigma,
    )  # fmt: skip
    accountant = PrivacyAccountant(plan.accountant)
    started = time.perf_counter()
    trained = train_private(
        workspace.model, data, workspace.collator, config.train, plan, accountant,
        max_grad_norm=config.dp.max_grad_norm, engine=args.engine, max_tokens=args.max_tokens,
        optimizer_kind=args.optimizer, check_budget=False,
    )  # fmt: skip
    # the clients' validation splits, never the test split: these probes choose the sweep's settings
    scores = [workspace.score("validation", pid) for pid in range(config.num_clients)]
    total = sum(s.num_examples for s in scores)
    val_accuracy = sum(s.accuracy * s.num_examples for s in scores) / total
    top_share = sum(s.top_class_share * s.num_examples for s in scores) / total
    row = {
        "command": shlex.join(["python", "benchmarks/dp_probe.py", *sys.argv[1:]]),
        "dataset": config.dataset, "client_examples": len(data), "sigma": args.sigma, "batch": args.batch,
        "steps": plan.steps_per_round, "optimizer": args.optimizer, "lr": args.lr, "head_only": args.head_only,
        "epsilon_rdp": accountant.epsilon(config.dp.delta) if args.sigma >= 0.3 else None,
        "train_loss": trained.loss, "validation_accuracy": val_accuracy, "validation_top_class_share": top_share,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    print(json.dumps(row))
    out = ROOT / "benchmarks" / "results" / "privacy-sweep" / "probes.jsonl"
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
