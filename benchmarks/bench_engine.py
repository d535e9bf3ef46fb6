"""Client-updates per second: the batched multi-client engine vs one-client-at-a-time vs centralized.

K clients each take E local steps of batch b (real TREC questions, dynamic padding everywhere):
- ``sequential``  — the ClientApp's path: per client, load its adapter, ``train_local``, read it back;
- ``batched``     — ``fedlowrank.engine.train_batched``: all K clients in shared forward/backward passes;
- ``centralized`` — one adapter on the same tokens, E steps of batch K·b (the physical limit).
Models: ``minilm`` (pretrained all-MiniLM-L6-v2) or ``small`` (a 2-layer BERT, hidden 128, from a config).
Prints a table, then summary lines (``ratio_to_limit <model> K=<K>: x``, ``speedup_vs_sequential ...``),
and writes ``benchmarks/results/engine/<name>.json``. Flower's Ray simulation is not part of this script
yet (issue 6), so there is no ``speedup_vs_flower`` line.

    python benchmarks/bench_engine.py --model small --clients 8,32,128,512 --steps 1 --batch 8
    python benchmarks/bench_engine.py --model minilm --clients 32 --steps 4 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from fedlowrank.adapters import adapter_state, attach_lora, load_adapter_state, set_trainable
from fedlowrank.config import LoraSettings, TrainSettings
from fedlowrank.data import load_task, tokenize
from fedlowrank.engine import ClientJob, train_batched
from fedlowrank.models import load_model, load_tokenizer
from fedlowrank.training import train_local


def build(model_name: str, device: torch.device):
    tokenizer = load_tokenizer("minilm")
    if model_name == "small":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            num_labels=6,
        )
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).to(device)
    else:
        model = load_model("minilm", "seq-cls", num_labels=6, label_names=[str(i) for i in range(6)], device=device)
    model = attach_lora(model, LoraSettings(r=8), "seq-cls")
    set_trainable(model, lora_a=True, lora_b=True, head=True)
    return model, tokenizer


def loaders(data, tokenizer, clients: int, steps: int, batch: int):
    """Client k gets its own contiguous E·b examples (cycling over the data), in a fixed order."""
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    per_client = steps * batch
    out = []
    for k in range(clients):
        indices = [(k * per_client + i) % len(data) for i in range(per_client)]
        subset = data.select(indices)
        out.append(torch.utils.data.DataLoader(subset, batch_size=batch, shuffle=False, collate_fn=collate))
    return out


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "small"), default="small")
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("FEDLOWRANK_DATA", "../shared/data"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "engine")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = build(args.model, device)
    from fedlowrank.config import DataSettings

    task = load_task("trec", args.data_dir, DataSettings())
    data = tokenize(task.train, tokenizer, "text", "label", 64).with_format(None)
    settings = TrainSettings(local_steps=args.steps, batch_size=args.batch, lr=5e-3)
    start = adapter_state(model)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        times: dict[str, list[float]] = {"sequential": [], "batched": [], "centralized": []}
        for _ in range(args.repeats):
            client_loaders = loaders(data, tokenizer, clients, args.steps, args.batch)

            def sequential(client_loaders=client_loaders):
                for loader in client_loaders:
                    load_adapter_state(model, start)
                    train_local(model, loader, settings)
                    adapter_state(model)

            def batched(client_loaders=client_loaders):
                jobs = [ClientJob(start, loader) for loader in client_loaders]
                train_batched(model, jobs, settings)

            central = loaders(data, tokenizer, 1, args.steps, args.batch * clients)[0]

            def centralized(central=central, clients=clients):
                load_adapter_state(model, start)
                train_local(model, central, TrainSettings(local_steps=args.steps, batch_size=args.batch * clients))

            for name, fn in (("sequential", sequential), ("batched", batched), ("centralized", centralized)):
                times[name].append(timed(fn))
        updates = clients * args.steps * args.batch
        row = {"model": args.model, "clients": clients, "steps": args.steps, "batch": args.batch}
        for name, values in times.items():
            row[f"{name}_s"] = statistics.median(values)
            row[f"{name}_examples_per_s"] = updates / statistics.median(values)
        row["ratio_to_limit"] = row["centralized_s"] / row["batched_s"]
        row["speedup_vs_sequential"] = row["sequential_s"] / row["batched_s"]
        rows.append(row)
        print(
            f"K={clients:4d}  sequential {row['sequential_examples_per_s']:8.1f} ex/s  batched "
            f"{row['batched_examples_per_s']:8.1f} ex/s  centralized {row['centralized_examples_per_s']:8.1f} ex/s"
        )
    for row in rows:
        print(f"ratio_to_limit {row['model']} K={row['clients']}: {row['ratio_to_limit']:.2f}")
        print(f"speedup_vs_sequential {row['model']} K={row['clients']}: {row['speedup_vs_sequential']:.1f}")
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"{args.model}-{device.type}-{torch.get_num_threads()}threads"
    (args.output / f"{name}.json").write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))
    print(f"wrote {args.output / (name + '.json')}")


if __name__ == "__main__":
    main()
