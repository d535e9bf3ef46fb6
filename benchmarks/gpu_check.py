"""Every open GPU question in one command, within a few minutes, written to one JSON file.

    make gpu-wheels                      # once, where PyPI is reachable: the wheels this needs into .whl/
    make gpu-check                       # on the GPU machine: installs .whl/ into /tmp/site, runs this
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU fallback (what the tests run)

Sections (each timed; one that fails is recorded with its error and the others still run):
- ``kernels``: every Triton kernel (multi-LoRA forward, its backward, per-sample gradients, per-sample norms)
  compiled and compared with its PyTorch twin in fp32 and bf16 (tolerance per dtype, relative to the norm),
  with the time of each side. Needs CUDA (skipped on a CPU: the tests run the kernels in Triton's interpreter).
- ``dp_fused``: one client's DP-SGD round on the fused per-sample path against the same round without privacy
  (same model, steps and expected batch): ``dp_to_plain_time``.
- ``engine``: K clients (``--clients``, 128) of E steps of batch b on a MiniLM-sized BERT built from its config
  (random weights: throughput does not depend on them; random token sequences of uneven length), trained by the
  batched engine, one after another (sequential) and as one centralized adapter on the pooled examples (the
  limit: the faster of one padded batch-K·b pass and the engine's length-sorted chunks, as in bench_engine.py):
  ``ratio_to_centralized`` and ``speedup_vs_sequential``.
- ``peak_gpu_memory_mb`` over the whole check.

Needs torch, transformers, peft (and triton on a GPU) plus opacus and its needs: nothing else of the project's
dependencies (no Flower, no datasets), and no network or model download. Summary lines, last:
``ratio_to_centralized gpu K=128: x`` and ``speedup_vs_sequential gpu K=128: x`` (``cpu`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # run as a script, by runpy, or imported by the tests
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

SECTIONS = ("kernels", "dp_fused", "engine")
# max |got − want| / max |want| allowed per dtype: fp32 accumulates in a different order; bf16 has 8 bits
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when there is one), 'cuda', 'cuda:1', 'cpu'")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--clients", type=int, default=128, help="K of the engine section")
    parser.add_argument("--steps", type=int, default=2, help="local steps E per client (engine section)")
    parser.add_argument("--batch", type=int, default=8, help="batch b per client (engine section)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (the CPU fallback, tests)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu" / "gpu_check.json")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown or 'none given'}; choose from {', '.join(SECTIONS)}")
    for name in ("clients", "steps", "batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.sections = sections
    return args


def resolve_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: torch sees no CUDA device here; use --device cpu (or auto)")
    return device


# ---- kernels -------------------------------------------------------------------------------------------------
def check_kernels(device, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedlowrank.kernels import triton_available

    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA device (the CPU tests run the kernels in Triton's interpreter)"}
    if not triton_available():
        return {"status": "failed", "reason": "triton does not import on this GPU machine"}
    clients, examples, tokens, d, r, k = (4, 16, 16, 64, 8, 64) if args.quick else (32, 256, 64, 384, 16, 384)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator(device="cpu").manual_seed(0)
        x, grad_out = (torch.randn(examples, tokens, n, generator=generator).to(device, dtype) for n in (d, k))
        A = (0.1 * torch.randn(clients, r, d, generator=generator)).to(device, dtype)
        B = (0.1 * torch.randn(clients, k, r, generator=generator)).to(device, dtype)
        index = torch.randint(0, clients, (examples,), generator=generator).to(device)
        cases = kernel_cases(x, A, B, index, grad_out)
        for name, run in cases.items():
            got, want = run("triton"), run("reference")
            error = max(
                float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30))
                for g, w in zip(got, want, strict=True)
            )
            tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
            triton_s = median_seconds(lambda run=run: run("triton"), device, args.repeats)
            reference_s = median_seconds(lambda run=run: run("reference"), device, args.repeats)
            results.append(
                {
                    "kernel": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "max_relative_error": error,
                    "tolerance": tolerance,
                    "ok": error <= tolerance,
                    "triton_ms": 1e3 * triton_s,
                    "reference_ms": 1e3 * reference_s,
                    "speedup": reference_s / triton_s,
                }
            )
    return {
        "status": "ok" if all(r["ok"] for r in results) else "failed",
        "shape": {"clients": clients, "examples": examples, "tokens": tokens, "d": d, "r": r, "k": k},
        "kernels": results,
    }


def kernel_cases(x, A, B, index, grad_out) -> dict[str, Any]:
    """Each kernel as ``backend -> tuple of outputs`` on these operands (LoRA scale 2)."""
    from fedlowrank.kernels import multi_lora, multi_lora_backward, per_sample_grad_norms_sq, per_sample_lora_grads

    return {
        "multi_lora": lambda backend: (multi_lora(x, A, B, index, 2.0, backend=backend),),
        "multi_lora_backward": lambda backend: multi_lora_backward(x, A, B, index, 2.0, grad_out, backend=backend),
        "per_sample_lora_grads": lambda backend: per_sample_lora_grads(x, A, B, index, 2.0, grad_out, backend=backend),
        "per_sample_grad_norms_sq": lambda backend: (
            per_sample_grad_norms_sq(x, A, B, index, 2.0, grad_out, backend=backend),
        ),
    }


# ---- a model and data that need no download --------------------------------------------------------------------
def bert_model(device, quick: bool):
    """A MiniLM-sized BERT classifier (6 layers, hidden 384) from its config, LoRA r 8 on query/value."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedlowrank.adapters import attach_lora
    from fedlowrank.config import LoraSettings

    size = (
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
        if quick
        else {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=6, **size)).to(device)
    return attach_lora(model, LoraSettings(r=8, target_modules=["query", "value"]), "seq-cls")


def random_examples(count: int, seed: int, max_tokens: int) -> list[dict[str, Any]]:
    """Token sequences of uneven length (max_tokens/4 .. max_tokens) with labels in 0..5."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(max_tokens // 4, max_tokens + 1, (1,), generator=generator))
        ids = [101] + torch.randint(1000, 30000, (length - 2,), generator=generator).tolist() + [102]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": int(seed * 7 + length) % 6})
    return rows


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Right-pads to the batch's longest example (dynamic padding, as the project's collators do)."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    return {
        "input_ids": torch.tensor([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in rows]),
        "attention_mask": torch.tensor([row["attention_mask"] + [0] * (width - len(row["input_ids"])) for row in rows]),
        "labels": torch.tensor([row["labels"] for row in rows]),
    }


def loader(rows: list[dict[str, Any]], batch: int, seed: int):
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch, shuffle=True, collate_fn=collate, generator=generator)


# ---- DP-SGD on the fused path ----------------------------------------------------------------------------------
def check_dp_fused(device, args: argparse.Namespace) -> dict[str, Any]:
    from fedlowrank.adapters import adapter_state, load_adapter_state
    from fedlowrank.config import TrainSettings
    from fedlowrank.privacy.accounting import PrivacyAccountant, plan_client
    from fedlowrank.privacy.dp_sgd import train_private
    from fedlowrank.training import train_local

    model = bert_model(device, args.quick)
    start = adapter_state(model)
    size, batch, steps = (64, 8, 2) if args.quick else (2048, 64, 8)
    rows = random_examples(size, 1, 32 if args.quick else 128)
    settings = TrainSettings(local_steps=steps, batch_size=batch, lr=5e-3)
    plan = plan_client(
        dataset_size=size, batch_size=batch, local_steps=steps, local_epochs=1, num_rounds=1, fraction_train=1.0,
        target_epsilon=1e6, delta=1e-5, noise_multiplier=1.0,
    )  # fmt: skip

    def private() -> None:
        load_adapter_state(model, start)
        accountant = PrivacyAccountant()
        train_private(
            model, rows, collate, settings, plan, accountant, max_grad_norm=1.0, engine="fused", check_budget=False
        )

    def plain() -> None:
        load_adapter_state(model, start)
        train_local(model, loader(rows, batch, 0), settings, "adamw")

    private_s, plain_s = median_seconds(private, device, args.repeats), median_seconds(plain, device, args.repeats)
    return {
        "status": "ok",
        "examples": size,
        "expected_batch": batch,
        "steps": steps,
        "dp_fused_round_s": private_s,
        "plain_round_s": plain_s,
        "dp_to_plain_time": private_s / plain_s,
    }


# ---- the batched engine ----------------------------------------------------------------------------------------
def check_engine(device, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from fedlowrank.adapters import adapter_state, load_adapter_state
    from fedlowrank.config import TrainSettings
    from fedlowrank.engine import ClientJob, PlainData, train_batched
    from fedlowrank.training import train_local

    model = bert_model(device, args.quick)
    start = adapter_state(model)
    clients, steps, batch = args.clients, args.steps, args.batch
    max_tokens = 32 if args.quick else 64
    data = [random_examples(steps * batch, 100 + k, max_tokens) for k in range(clients)]
    settings = TrainSettings(local_steps=steps, batch_size=batch, lr=5e-3)
    examples = clients * steps * batch

    chunk_tokens = 32_768 if device.type == "cuda" else 4_096

    def batched() -> None:
        jobs = [ClientJob(start, PlainData(loader(rows, batch, k)), k) for k, rows in enumerate(data)]
        train_batched(model, jobs, settings, "adamw", max_tokens=chunk_tokens)

    def sequential() -> None:
        for k, rows in enumerate(data):
            load_adapter_state(model, start)
            train_local(model, loader(rows, batch, k), settings, "adamw", seed=k)

    pooled = dataclasses.replace(settings, batch_size=clients * batch, local_steps=steps)
    everything = [row for rows in data for row in rows]

    # the limit: one adapter, batch K·b, the same examples; the faster of one padded pass and the engine's
    # length-sorted token chunks (a K·b batch padded to its longest example wastes most of its compute)
    def centralized_plain() -> None:
        load_adapter_state(model, start)
        train_local(model, loader(everything, clients * batch, 0), pooled, "adamw")

    def centralized_chunked() -> None:
        job = ClientJob(start, PlainData(loader(everything, clients * batch, 0)), 0)
        train_batched(model, [job], pooled, "adamw", max_tokens=chunk_tokens)

    runs = {"batched": batched, "sequential": sequential}
    runs.update({"centralized_plain": centralized_plain, "centralized_chunked": centralized_chunked})
    seconds = {name: median_seconds(fn, device, args.repeats) for name, fn in runs.items()}
    seconds["centralized"] = min(seconds["centralized_plain"], seconds["centralized_chunked"])
    rate = {name: examples / s for name, s in seconds.items()}
    return {
        "status": "ok",
        "clients": clients,
        "steps": steps,
        "batch": batch,
        "examples_per_round": examples,
        "examples_per_s": rate,
        "ratio_to_centralized": rate["batched"] / rate["centralized"],
        "speedup_vs_sequential": rate["batched"] / rate["sequential"],
    }


CHECKS = {"kernels": check_kernels, "dp_fused": check_dp_fused, "engine": check_engine}


def environment(device) -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "triton", "transformers", "peft", "opacus"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # a missing package is a finding, not a crash
            versions[name] = f"missing ({type(exc).__name__})"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "python": platform.python_version(), "versions": versions}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])}
    report["environment"] = environment(device)
    for name in args.sections:
        began = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            report[name] = CHECKS[name](device, args)
        except Exception as exc:  # record and go on: the other sections' answers are still worth having
            report[name] = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        report[name]["seconds"] = time.perf_counter() - began
        print(f"[gpu-check] {name}: {report[name]['status']} in {report[name]['seconds']:.1f} s", flush=True)
    if device.type == "cuda":
        report["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")
    engine = report.get("engine", {})
    where = "gpu" if device.type == "cuda" else "cpu"
    if engine.get("status") == "ok":
        print(f"ratio_to_centralized {where} K={args.clients}: {engine['ratio_to_centralized']:.2f}")
        print(f"speedup_vs_sequential {where} K={args.clients}: {engine['speedup_vs_sequential']:.2f}")
    return report


if __name__ == "__main__":
    outcome = main()
    failed = [name for name in SECTIONS if outcome.get(name, {}).get("status") == "failed"]
    sys.exit(1 if failed else 0)
