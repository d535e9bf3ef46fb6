"""Optimizer state bytes and step time: torch AdamW vs GaLoreAdamW (each projector) on MiniLM full fine-tuning.

GaLore runs on the 2-D attention and FFN weights of the encoder (36 matrices, 384 x 384 and 1536 x 384);
everything else (embeddings, LayerNorms, biases, pooler, head) gets ordinary AdamW in every variant.
Batches are synthetic token ids (timing does not depend on the text).

Timing: every optimizer trains its own copy of the model; after one warm-up step, repeats are interleaved
across optimizers (fwd+bwd, then ``optimizer.step()``), and medians are reported. A refresh step (every
projector rebuilds its basis) is timed separately via ``request_refresh()``, and the per-step cost at refresh
gap T is amortised as (refresh + (T − 1)·normal) / T. Timed steps never cross a scheduled refresh.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_optimizers.py --repeats 5 --name cpu-1thread

Writes ``benchmarks/results/optimizers/<name>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedlowrank.galore import GaLoreAdamW, galore_param_groups, optimizer_state_breakdown  # noqa: E402
from fedlowrank.models import load_model  # noqa: E402

TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PROJECTORS = ["svd", "randomized-svd", "gaussian", "dct"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="model name or local path (default: the offline alias)")
    parser.add_argument("--repeats", type=int, default=5, help="timed (fwd+bwd+step) repeats per optimizer")
    parser.add_argument("--step-repeats", type=int, default=2, help="extra timed optimizer.step() calls per repeat")
    parser.add_argument("--refresh-repeats", type=int, default=2, help="timed refresh steps per optimizer")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=200, help="projector refresh gap T")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--projectors", default=",".join(PROJECTORS), help="comma-separated projector kinds")
    parser.add_argument("--moment-policy", default="keep", choices=["keep", "reset", "rotate"])
    parser.add_argument("--name", default="minilm-cpu")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results" / "optimizers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, len(TREC_LABELS), (batch_size,), generator=generator),
    }


def build_variants(base: torch.nn.Module, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """One (name, model copy, optimizer, projected params) per variant; notes on skipped ones."""
    variants: list[dict[str, Any]] = []
    notes: list[str] = []
    model = copy.deepcopy(base)
    variants.append(
        {"name": "adamw (torch)", "model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=args.lr)}
    )
    for kind in [k for k in args.projectors.split(",") if k]:
        model = copy.deepcopy(base)
        groups = galore_param_groups(
            model, TARGET_MODULES, args.rank, args.gap, args.scale, kind, args.moment_policy, seed=args.seed
        )
        optimizer = GaLoreAdamW(groups, lr=args.lr, weight_decay=0.01)
        variants.append({"name": f"galore-{kind}", "model": model, "optimizer": optimizer})
    try:
        from galore_torch import GaLoreAdamW as ReferenceGaLore  # optional third-party reference

        model = copy.deepcopy(base)
        ours = galore_param_groups(model, TARGET_MODULES, args.rank)
        groups = [
            {
                "params": ours[0]["params"],
                "rank": args.rank,
                "update_proj_gap": args.gap,
                "scale": args.scale,
                "proj_type": "std",
            },
            {"params": ours[1]["params"]},
        ]
        optimizer = ReferenceGaLore(groups, lr=args.lr)
        variants.append({"name": "galore-torch", "model": model, "optimizer": optimizer})
    except ImportError:
        notes.append("galore-torch is not installed: its reference GaLoreAdamW was skipped")
    return variants, notes


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    return time.perf_counter() - start


def timed_step(optimizer: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def projected_state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """State bytes held for ``params`` only (moments and projector bases)."""
    total = 0
    for param in params:
        for key, value in optimizer.state.get(param, {}).items():
            if key == "step":
                continue
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "basis_nbytes"):
                total += value.basis_nbytes()
            elif hasattr(value, "ortho_matrix") and isinstance(value.ortho_matrix, torch.Tensor):
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()  # galore-torch projector
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    planned_steps = 1 + args.refresh_repeats + args.repeats * (1 + args.step_repeats)
    if planned_steps >= args.gap:
        raise SystemExit(f"{planned_steps} steps per optimizer would cross a scheduled refresh (gap {args.gap})")
    base = load_model(args.model, "seq-cls", num_labels=len(TREC_LABELS), label_names=TREC_LABELS, device="cpu")
    base.train()
    batch = synthetic_batch(base.config.vocab_size, args.batch_size, args.seq_len, args.seed)
    variants, notes = build_variants(base, args)
    # The same weights in every copy, by name: AdamW's state on them is the baseline of the state target.
    base_names = {id(p): n for n, p in base.named_parameters()}
    projected_names = [base_names[id(p)] for p in galore_param_groups(base, TARGET_MODULES, args.rank)[0]["params"]]
    projected_shapes = sorted({tuple(base.get_parameter(n).shape) for n in projected_names})
    for variant in variants:  # warm-up: allocates state and builds the first bases (step 0)
        forward_backward(variant["model"], batch)
        variant["first_step_s"] = timed_step(variant["optimizer"])
        variant.update(fwd_bwd=[], step=[], full=[], refresh=[])
    for _ in range(args.refresh_repeats):
        for variant in variants:
            optimizer = variant["optimizer"]
            if isinstance(optimizer, GaLoreAdamW):
                optimizer.zero_grad(set_to_none=True)
                forward_backward(variant["model"], batch)
                optimizer.request_refresh()
                variant["refresh"].append(timed_step(optimizer))
    for _ in range(args.repeats):
        for variant in variants:
            model, optimizer = variant["model"], variant["optimizer"]
            optimizer.zero_grad(set_to_none=True)
            fwd_bwd = forward_backward(model, batch)
            step = timed_step(optimizer)
            variant["fwd_bwd"].append(fwd_bwd)
            variant["step"].append(step)
            variant["full"].append(fwd_bwd + step)
            for _ in range(args.step_repeats):
                variant["step"].append(timed_step(optimizer))
    adamw_projected = None
    results = []
    for variant in variants:
        optimizer = variant["optimizer"]
        breakdown = optimizer_state_breakdown(optimizer)
        step = statistics.median(variant["step"])
        fwd_bwd = statistics.median(variant["fwd_bwd"])
        refresh = statistics.median(variant["refresh"]) if variant["refresh"] else None
        amortised = step if refresh is None else (refresh + (args.gap - 1) * step) / args.gap
        on_projected = projected_state_bytes(optimizer, [variant["model"].get_parameter(n) for n in projected_names])
        if adamw_projected is None:
            adamw_projected = on_projected
        results.append(
            {
                "optimizer": variant["name"],
                "state_bytes": breakdown["total"],
                "state_breakdown": breakdown,
                "state_bytes_projected_weights": on_projected,
                "state_ratio_projected_weights": on_projected / adamw_projected if adamw_projected else None,
                "fwd_bwd_s": fwd_bwd,
                "full_step_s": statistics.median(variant["full"]),
                "optimizer_step_s": step,
                "refresh_step_s": refresh,
                "amortised_optimizer_step_s": amortised,
                "amortised_full_step_s": fwd_bwd + amortised,
                "first_step_s": variant["first_step_s"],
                "samples": {
                    "step": len(variant["step"]),
                    "full": len(variant["full"]),
                    "refresh": len(variant["refresh"]),
                },
            }
        )
    base_result = results[0]
    min_side = min((min(shape) for shape in projected_shapes), default=0)
    state_target = 2 * args.rank / min_side if min_side else None
    for result in results:
        result["amortised_full_step_vs_adamw"] = result["amortised_full_step_s"] / base_result["amortised_full_step_s"]
        result["amortised_optimizer_step_vs_adamw"] = (
            result["amortised_optimizer_step_s"] / base_result["amortised_optimizer_step_s"]
        )
        if result is not base_result:
            result["meets_state_target"] = bool(
                state_target and result["state_ratio_projected_weights"] <= state_target
            )
            result["meets_time_target"] = result["amortised_full_step_vs_adamw"] <= 1.15
    return {
        "benchmark": "optimizers",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_parameters": sum(p.numel() for p in base.parameters()),
        "projected_weights": {
            "count": len(projected_names),
            "parameters": sum(base.get_parameter(n).numel() for n in projected_names),
            "shapes": [list(s) for s in projected_shapes],
        },
        "targets": {
            "state_ratio_projected_weights_max": state_target,
            "state_target_rule": "state on the projected weights <= 2r/m of AdamW's (m: the compressed side)",
            "amortised_full_step_vs_adamw_max": 1.15,
        },
        "machine": {
            "torch": torch.__version__,
            "threads": args.threads,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "note": "CPU shared with other jobs: timings are indicative only",
        },
        "notes": notes,
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    headers = [
        "optimizer",
        "state MB",
        "proj. state",
        "step ms",
        "refresh ms",
        "amort. step ms",
        "fwd+bwd+step ms",
        "amort. full vs AdamW",
    ]
    rows = []
    for r in report["results"]:
        rows.append(
            [
                r["optimizer"],
                f"{r['state_bytes'] / 2**20:.1f}",
                f"{r['state_ratio_projected_weights']:.3f}" if r["state_ratio_projected_weights"] is not None else "-",
                f"{r['optimizer_step_s'] * 1e3:.1f}",
                f"{r['refresh_step_s'] * 1e3:.0f}" if r["refresh_step_s"] is not None else "-",
                f"{r['amortised_optimizer_step_s'] * 1e3:.1f}",
                f"{r['full_step_s'] * 1e3:.0f}",
                f"{r['amortised_full_step_vs_adamw']:.3f}",
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Optimizers on {report['config']['model']} ({report['config']['threads']} thread(s))")
        for header in headers:
            table.add_column(header, justify="left" if header == "optimizer" else "right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(Console().width, 150)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    targets = report["targets"]
    print(
        f"proj. state = GaLore state on the {report['projected_weights']['count']} projected weights / AdamW's; "
        f"target <= {targets['state_ratio_projected_weights_max']:.3f} (2r/m); "
        f"time target: amortised full step <= {targets['amortised_full_step_vs_adamw_max']}x AdamW"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"note: {report['machine']['note']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
