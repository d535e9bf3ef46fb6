"""Client-updates per second of one federated round: the batched engine vs Flower's Ray simulation vs a
sequential loop vs centralized training (the physical limit), all on the same app, data and model.

K clients each take E local steps of batch b (``--sizes equal``: every client holds E·b real TREC questions)
or one local epoch over a quantity-skewed share of K·E·b questions (``--sizes uneven``: client sizes from
Dirichlet(0.5), at least one question each; ``data.partitioner = "quantity-skew"``; the largest clients take
many steps one after another), or E local steps of batch b over such a share (``--sizes uneven-steps``: a
client with fewer than b questions trains on all it has; with E = 1, the issue's "one step of batch 8" at
uneven sizes). Modes, each in its own process so that nothing is shared between them:
- ``flower``      — the fedlowrank ServerApp and ClientApp under Flower's Ray simulation (``run_simulation``),
                    one CPU per client (``--flower-gpus`` per client on a GPU);
- ``batched``     — the same apps in process through ``BatchedGrid`` (``engine = "batched"``);
- ``sequential``  — the same apps in process, one ClientApp call after another (``InProcessGrid``);
- ``centralized`` — one adapter trained on the same examples, batch K·b (the hardware limit);
- ``paired``      — ``batched`` and ``centralized`` in one process, measured in turn: after each federated
                    round the limit's pass on the same examples (the faster of its two forms, chosen after
                    round 1), so that a drift of the machine's speed, which moves separate processes' times by
                    up to 50 % here, hits both sides of each ratio alike; its ratio is the median over the
                    round pairs (``paired_ratio_to_limit``). Not in the default modes;
- ``cohorts``     — past one process: the same apps under Flower's simulation engine with ``--nodes`` cohort
                    nodes (``cohort-nodes``), each a process with cores/nodes threads hosting its share of the K
                    clients and training its sampled ones with the batched engine. Not in the default modes:
                    ``--modes batched,cohorts`` compares it with one in-process batched run on every core;
- ``ceiling``     — what the hardware allows past one process: ``train_batched`` alone (no Flower, no replies,
                    no server) on the K clients' round, once in one process on every core and once split as the
                    cohort nodes split it (client k in process k mod N, cores/N threads each, the N processes
                    timed together); its rate is the split's, and ``ratio_nodes_to_one_process`` of the engine
                    alone is the most that ``cohorts`` could gain.
Dynamic padding everywhere. A federated mode's time is the median ``train_round_time`` (configure, train,
aggregate; no evaluation) of rounds 2..R: start-up and the first round's warm-up (Ray actors, model loading)
are excluded for every mode alike. Peak memory is the machine's RAM in use above the mode's start (all
processes, Ray's included), and on CUDA the peak allocated device memory.

Prints a table, then one summary line per target it measured, last:
``ratio_to_limit minilm K=32: x``, ``speedup_vs_flower small K=512: x`` and, on a GPU,
``speedup_vs_flower gpu K=128: x``, ``ratio_to_centralized gpu K=128: x``, and with ``cohorts``
``ratio_two_nodes_to_one_process small K=128: x`` (with ``ceiling``: ``ceiling_two_processes_to_one small
K=128: x``). Writes JSON to
``benchmarks/results/engine/<model>-<device>.json``.

    python benchmarks/bench_engine.py --model small --clients 8,32,128,512 --steps 1 --batch 8
    python benchmarks/bench_engine.py --model minilm --clients 32 --steps 4 --batch 16 --sizes equal
    python benchmarks/bench_engine.py --model decoder --clients 8,32 --steps 2 --batch 4
    python benchmarks/bench_engine.py --model small --clients 128 --modes batched,cohorts,ceiling --nodes 2 --repeats 3

``--model decoder``: instruction tuning of a config-built Llama (hidden 256, 4 layers, random weights: the
speed does not depend on them; character tokens) on the shipped GSM8K, 128 tokens, LoRA on q/v; the table
adds tokens per second (examples/s times the mean tokens of the clients' examples, the same for every mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("flower", "batched", "sequential", "centralized", "cohorts", "ceiling", "paired")
DEFAULT_MODES = MODES[:4]
SIZES = ("equal", "uneven", "uneven-steps")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_model_folder(cache: Path) -> str:
    """A 2-layer BERT (hidden 128) built from a config, saved with MiniLM's tokenizer so apps load it by path."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedlowrank.models import load_tokenizer

    folder = cache / "small-bert-h128-l2"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer("minilm")
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=512,
            num_labels=6,
        )
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def decoder_model_folder(cache: Path) -> str:
    """A Llama-family decoder (hidden 256, 4 layers) built from a config, with a character tokenizer."""
    from fedlowrank.tiny_models import save_tiny_decoder

    folder = cache / "llama-h256-l4"
    if not (folder / "config.json").is_file():
        save_tiny_decoder("llama", folder, hidden=256, layers=4)
    return str(folder)


MODEL_FOLDERS = {"small": small_model_folder, "decoder": decoder_model_folder}


def run_config(args: argparse.Namespace, mode: str, clients: int, sizes: str, output: Path):
    from fedlowrank.config import RunConfig

    examples = clients * args.steps * args.batch
    decoder = args.model == "decoder"
    flat = {
        "name": f"{mode}-{clients}-{sizes}",
        "output-dir": str(output),
        "data-dir": args.data_dir,
        "model": MODEL_FOLDERS[args.model](output) if args.model in MODEL_FOLDERS else "minilm",
        "strategy": "fedit",
        "num-clients": clients,
        "num-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "server-eval-every": 10_000,  # evaluation only after the last round, outside the timed phase
        "device": args.device,
        "engine": "batched" if mode in ("batched", "paired") else "sequential",
        "cohort-nodes": args.nodes if mode == "cohorts" else 0,
        "engine-max-tokens": args.max_tokens,
        "data.partitioner": "iid" if sizes == "equal" else "quantity-skew",
        "data.dirichlet-alpha": 0.5,
        "data.validation-fraction": 0.0,
        "data.min-partition-size": 1,
        "data.max-train-examples": examples,
        "data.max-test-examples": 64,
        "data.max-length": 64,
        "train.batch-size": args.batch,
        "train.local-steps": 0 if sizes == "uneven" else args.steps,  # uneven: one local epoch
        "train.local-epochs": 1.0,
        "train.lr": 5e-3,
    }
    if decoder:  # instruction data have no label to skew by: equal (IID) sizes only
        flat.update({"task": "causal-lm", "dataset": "gsm8k", "data.partitioner": "iid", "data.max-length": 128})
        flat.update({"data.max-test-examples": 8, "train.generate-examples": 1, "train.max-new-tokens": 1})
    return RunConfig.from_flat(flat)


def mean_tokens(workspace, config) -> float:
    """Mean tokens (padding excluded) of the clients' training examples."""
    lengths = [
        len(ids) for pid in range(config.num_clients) for ids in workspace.client_train_dataset(pid)["input_ids"]
    ]
    return sum(lengths) / max(len(lengths), 1)


class MemoryWatch:
    """Peak RAM in use on the machine (all processes) above the level at start; peak CUDA memory."""

    def __init__(self) -> None:
        import psutil

        self._psutil, self.base = psutil, psutil.virtual_memory().used
        self.peak, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._psutil.virtual_memory().used)

    def __enter__(self) -> MemoryWatch:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict[str, float]:
        import torch

        out = {"peak_ram_mb": (self.peak - self.base) / 2**20}
        if torch.cuda.is_available():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def federated_round_time(config) -> tuple[float, int, dict]:
    """Median train-phase time of rounds 2..R from the run's metrics, the examples one round trains, and with
    cohort nodes the median time of a round's slowest node (the rest of a round is the runtime's and server's)."""
    from fedlowrank.runtime import get_workspace

    rows = [json.loads(line) for line in (Path(config.output_dir) / config.name / "metrics.jsonl").open()]
    rows = [row for row in rows if "train_round_time" in row]
    steady = rows[1:] if len(rows) > 1 else rows
    extra = {}
    if all(row.get("cohort_node_seconds") for row in steady):
        extra["slowest_node_seconds"] = statistics.median(max(row["cohort_node_seconds"].values()) for row in steady)
    seconds = statistics.median(row["train_round_time"] for row in steady)
    return seconds, examples_per_round(get_workspace(config), config), extra


def examples_per_round(workspace, config, clients: list[int] | None = None) -> int:
    from fedlowrank.training import planned_steps

    total = 0
    for pid in range(config.num_clients) if clients is None else clients:
        size = len(workspace.client_train_dataset(pid))
        if config.train.local_steps > 0:  # the loader's batches, cycled: b, ..., b, size mod b, b, ...
            batch = config.train.batch_size
            epoch = [batch] * (size // batch) + ([size % batch] if size % batch else [])
            total += sum(epoch[step % len(epoch)] for step in range(config.train.local_steps))
        else:
            steps = planned_steps(config.train, size)
            total += min(steps * config.train.batch_size, size)  # one epoch: every example once
    return total


def worker(args: argparse.Namespace) -> dict:
    """Run one mode at one K in this process; returns its measurement."""
    import torch

    torch.manual_seed(0)
    output = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    config = run_config(args, args.worker, args.worker_clients, args.worker_sizes, output)
    with MemoryWatch() as memory:
        extra: dict = {}
        if args.worker == "centralized":
            seconds, examples, extra = centralized(config, args)
        elif args.worker == "paired":
            seconds, examples, extra = paired(config)
        elif args.worker == "ceiling":
            seconds, examples = engine_alone(config, args)
        elif args.worker in ("flower", "cohorts"):
            from flwr.simulation import run_simulation

            from clients.client_app import make_client_app
            from strategies.server_app import make_server_app

            nodes = config.cohort_nodes or config.num_clients
            cpus = os.cpu_count() or 1
            run_simulation(
                server_app=make_server_app(config),
                client_app=make_client_app(config),
                num_supernodes=nodes,
                backend_name="ray",
                backend_config={
                    # cohort nodes: the cores shared out, each node a process with its own threads
                    "client_resources": {"num_cpus": max(1, cpus // nodes) if config.cohort_nodes else 1,
                                         "num_gpus": args.flower_gpus},
                    "init_args": {"num_cpus": cpus, "include_dashboard": False},
                },
            )  # fmt: skip
            seconds, examples, extra = federated_round_time(config)
        else:
            from fedlowrank.progress import Reporter
            from simulations.run import run_inprocess

            run_inprocess(config, Reporter())
            seconds, examples, extra = federated_round_time(config)
    if config.task == "causal-lm":
        from fedlowrank.runtime import get_workspace

        extra["tokens_per_s"] = examples / seconds * mean_tokens(get_workspace(config), config)
    return {"seconds": seconds, "examples": examples, "examples_per_s": examples / seconds, **extra, **memory.as_dict()}


def limit_passes(config) -> tuple[dict[str, Callable[[], None]], int]:
    """One adapter on the clients' pooled examples, batch K·b, as many examples as one federated round, in two
    forms: plain ``train_local`` and the same batches in the batched engine's length-sorted chunks. Returns
    the two passes and the examples one pass trains."""
    import dataclasses

    from fedlowrank.adapters import load_adapter_state
    from fedlowrank.engine import ClientJob, PlainData, train_batched
    from fedlowrank.runtime import get_workspace
    from fedlowrank.training import train_local

    workspace = get_workspace(config)
    examples = examples_per_round(workspace, config)
    # batch K·b, or a round's examples if fewer (uneven-steps: clients with fewer than b questions)
    pooled = dataclasses.replace(config.train, batch_size=min(config.num_clients * config.train.batch_size, examples))
    pooled.local_steps = max(1, -(-examples // pooled.batch_size))
    workspace.config = dataclasses.replace(config, train=pooled)  # its train loader batches K·b
    loader = workspace.train_loader(seed=0)
    workspace.config = config

    def plain() -> None:  # train_local: each batch of K·b padded to its longest example
        load_adapter_state(workspace.model, workspace.initial_state)
        train_local(workspace.model, loader, pooled)

    def chunked() -> None:  # the same batches through length-sorted token chunks (gradient accumulation)
        job = ClientJob(workspace.initial_state, PlainData(loader), 0)
        train_batched(workspace.model, [job], pooled, max_tokens=resolved_max_tokens(config))

    return {"plain": plain, "chunked": chunked}, min(examples, pooled.local_steps * pooled.batch_size)


def timed(fn: Callable[[], None]) -> float:
    import torch

    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def centralized(config, args: argparse.Namespace) -> tuple[float, int, dict]:
    """The limit's time: the faster of its two forms (``limit_passes``), each the median of passes 2..R."""
    passes, processed = limit_passes(config)
    best = {}
    for name, fn in passes.items():
        times = [timed(fn) for _ in range(args.rounds)]
        best[name] = statistics.median(times[1:] if len(times) > 1 else times)  # the first pass warms up
    return min(best.values()), processed, {f"centralized_{k}_examples_per_s": processed / v for k, v in best.items()}


def paired(config) -> tuple[float, int, dict]:
    """A batched federated run with the limit's pass after each round (``limit_passes``, both forms after round 1,
    the faster one after rounds 2..R): per round pair, federated rate ÷ limit rate on the same examples."""
    from fedlowrank.progress import Reporter
    from simulations.run import run_inprocess

    passes, processed = limit_passes(config)

    class LimitBetweenRounds(Reporter):
        def __init__(self) -> None:
            self.pairs: list[tuple[float, float]] = []
            self.chosen = ""

        def round_finished(self, row: dict) -> None:
            if row["round"] == 1:  # warm-up: both forms once, the faster one from then on
                self.chosen = min(passes, key=lambda name: timed(passes[name]))
            else:
                self.pairs.append((row["train_round_time"], timed(passes[self.chosen])))

    reporter = LimitBetweenRounds()
    run_inprocess(config, reporter)
    seconds, examples, extra = federated_round_time(config)
    ratios = [(examples / federated) / (processed / limit) for federated, limit in reporter.pairs]
    extra.update(
        paired_ratio_to_limit=statistics.median(ratios),
        paired_ratios=ratios,
        limit_form=reporter.chosen,
        limit_examples_per_s=processed / statistics.median(limit for _, limit in reporter.pairs),
    )
    return seconds, examples, extra


def engine_alone(config, args: argparse.Namespace) -> tuple[float, int]:
    """``train_batched`` on this part's clients (client k in part k mod parts; ``--worker-part`` of
    ``--worker-parts``) with cores/parts threads: the median of rounds 2..R, after every part has loaded."""
    import torch

    from fedlowrank.engine import ClientJob, PlainData, train_batched
    from fedlowrank.runtime import get_workspace

    part, parts = args.worker_part, args.worker_parts
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // parts))
    workspace = get_workspace(config)
    clients = [k for k in range(config.num_clients) if k % parts == part]
    start = workspace.adapter_snapshot()
    examples = examples_per_round(workspace, config, clients)
    barrier = Path(args.worker_barrier)
    (barrier / f"ready-{part}").touch()  # the parts are timed together: none trains while another still loads
    deadline = time.monotonic() + args.timeout
    while len(list(barrier.glob("ready-*"))) < parts and time.monotonic() < deadline:
        time.sleep(0.05)
    times = []
    for server_round in range(1, args.rounds + 1):
        jobs = [ClientJob(start, PlainData(workspace.client_train_loader(k, seed=server_round * 10_007 + k)), k)
                for k in clients]  # fmt: skip
        started = time.perf_counter()
        train_batched(workspace.model, jobs, config.train, config.optimizer, resolved_max_tokens(config))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:] if len(times) > 1 else times), examples


def run_ceiling(args: argparse.Namespace, clients: int, sizes: str) -> dict:
    """The engine alone, in one process on every core, then split over ``--nodes`` processes at once."""
    with tempfile.TemporaryDirectory() as barrier:
        one = run_mode(args, "ceiling", clients, sizes, (0, 1), barrier)
    with tempfile.TemporaryDirectory() as barrier, ThreadPoolExecutor(args.nodes) as pool:
        parts = list(pool.map(lambda p: run_mode(args, "ceiling", clients, sizes, (p, args.nodes), barrier),
                              range(args.nodes)))  # fmt: skip
    failed = [run for run in (one, *parts) if "error" in run]
    if failed:
        return failed[0]
    seconds = max(run["seconds"] for run in parts)  # a round of the split is done when its slowest part is
    examples = sum(run["examples"] for run in parts)
    return {
        "seconds": seconds,
        "examples": examples,
        "examples_per_s": examples / seconds,
        "one_process_examples_per_s": one["examples_per_s"],
        "ratio_nodes_to_one_process": examples / seconds / one["examples_per_s"],
        "part_seconds": [run["seconds"] for run in parts],
        "peak_ram_mb": max(run["peak_ram_mb"] for run in parts),  # machine-wide already: every part sees all
    }


def resolved_max_tokens(config) -> int:
    from clients.trainers import engine_max_tokens

    return engine_max_tokens(config)


def run_mode(
    args: argparse.Namespace, mode: str, clients: int, sizes: str, part: tuple[int, int] = (0, 1), barrier: str = ""
) -> dict:
    """``mode`` at K = ``clients`` in a process of its own (``part``, ``barrier``: one part of ``ceiling``)."""
    if mode == "ceiling" and not barrier:
        return run_ceiling(args, clients, sizes)
    command = [sys.executable, __file__, "--worker", mode, "--worker-clients", str(clients), "--worker-sizes", sizes]
    command += ["--worker-part", str(part[0]), "--worker-parts", str(part[1]), "--worker-barrier", barrier or "."]
    for name in ("model", "steps", "batch", "rounds", "device", "data_dir", "flower_gpus", "max_tokens", "nodes"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, with every repeat's throughput beside it (the first failure if any)."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["examples_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "examples_per_s_repeats": [run["examples_per_s"] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "small", "decoder"), default="small")
    parser.add_argument("--clients", default="8,32,128,512")
    parser.add_argument(
        "--sizes", default="equal", help=f"comma-separated, of {', '.join(SIZES)}; 'both': equal,uneven"
    )
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"any of {', '.join(MODES)}")
    parser.add_argument("--nodes", type=int, default=2, help="cohort nodes of the 'cohorts' mode")
    parser.add_argument("--repeats", type=int, default=1, help="measure each mode this many times (the spread)")
    parser.add_argument("--steps", type=int, default=1, help="local steps E per client (equal sizes)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per federated run (rounds 2.. are timed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=0, help="engine-max-tokens (0: the engine's automatic)")
    parser.add_argument("--flower-gpus", type=float, default=0.0, help="Flower client_resources num_gpus")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per mode before it is abandoned")
    parser.add_argument("--data-dir", default=os.environ.get("FEDLOWRANK_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "engine")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-sizes", help=argparse.SUPPRESS)
    parser.add_argument("--worker-part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-parts", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-barrier", default=".", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    sizes_list = ["equal", "uneven"] if args.sizes == "both" else [s.strip() for s in args.sizes.split(",")]
    if set(sizes_list) - set(SIZES):
        parser.error(f"unknown --sizes {sorted(set(sizes_list) - set(SIZES))}; choose from {', '.join(SIZES)}")
    if args.model == "decoder" and sizes_list != ["equal"]:
        parser.error("--model decoder: instruction data are split IID (no label to skew by); use --sizes equal")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    rows = []
    header = f"{'model':7} {'sizes':12} {'K':>4} " + " ".join(f"{m + ' ex/s':>16}" for m in modes)
    print(f"device: {device_name} | E={args.steps} b={args.batch} | {args.rounds} rounds, rounds 2.. timed")
    print(header + f" {'batched/limit':>14} {'batched/flower':>15} {'peak MB (b/f)':>15}")
    for sizes in sizes_list:
        for clients in [int(c) for c in args.clients.split(",")]:
            row: dict = {
                "model": args.model,
                "sizes": sizes,
                "clients": clients,
                "steps": args.steps,
                "batch": args.batch,
            }
            repeats: dict[str, list[dict]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):  # interleaved, so that a drift of the machine hits every mode alike
                for mode in modes:
                    repeats[mode].append(run_mode(args, mode, clients, sizes))
            for mode in modes:
                row[mode] = median_run(repeats[mode])
            rate = {m: row[m].get("examples_per_s") for m in modes}
            if rate.get("cohorts") and rate.get("batched"):
                row["ratio_nodes_to_one_process"] = rate["cohorts"] / rate["batched"]
                paired = zip(repeats["cohorts"], repeats["batched"], strict=True)
                row["ratio_nodes_to_one_process_repeats"] = [
                    c["examples_per_s"] / b["examples_per_s"] for c, b in paired
                ]
            if rate.get("ceiling"):
                row["ceiling_nodes_to_one_process"] = row["ceiling"]["ratio_nodes_to_one_process"]
                row["ceiling_nodes_to_one_process_repeats"] = [
                    run["ratio_nodes_to_one_process"] for run in repeats["ceiling"]
                ]
            if rate.get("batched") and rate.get("centralized"):
                row["ratio_to_limit"] = rate["batched"] / rate["centralized"]
                paired = zip(repeats["batched"], repeats["centralized"], strict=True)  # run one after the other
                row["ratio_to_limit_repeats"] = [b["examples_per_s"] / c["examples_per_s"] for b, c in paired]
            if rate.get("paired"):
                ratios = [ratio for run in repeats["paired"] for ratio in run["paired_ratios"]]
                row["paired_ratio_to_limit"] = statistics.median(ratios)
                row["paired_ratio_to_limit_repeats"] = [run["paired_ratio_to_limit"] for run in repeats["paired"]]
                row["paired_ratio_to_limit_range"] = [min(ratios), max(ratios)]
            if rate.get("batched") and rate.get("flower"):
                row["speedup_vs_flower"] = rate["batched"] / rate["flower"]
            if rate.get("batched") and rate.get("sequential"):
                row["speedup_vs_sequential"] = rate["batched"] / rate["sequential"]
            rows.append(row)
            limit_ratio = row.get("ratio_to_limit", row.get("paired_ratio_to_limit", float("nan")))
            cells = " ".join(f"{rate[m]:16.1f}" if rate[m] else f"{'failed':>16}" for m in modes)
            memory = "/".join(
                f"{row[m].get('peak_ram_mb', float('nan')):.0f}" for m in ("batched", "flower") if m in row
            )
            print(
                f"{args.model:7} {sizes:12} {clients:4d} {cells} {limit_ratio:14.2f} "
                f"{row.get('speedup_vs_flower', float('nan')):15.2f} {memory:>15}",
                flush=True,
            )
            if args.model == "decoder":
                tokens = " ".join(f"{m} {row[m].get('tokens_per_s', float('nan')):.0f}" for m in modes)
                print(f"  tokens/s: {tokens}")
            for mode in modes:
                if "error" in row[mode]:
                    print(f"  {mode} failed: {row[mode]['error']}")
    args.output.mkdir(parents=True, exist_ok=True)
    on_gpu = args.device.startswith("cuda")
    path = args.output / f"{args.model}-{'gpu' if on_gpu else 'cpu'}-E{args.steps}-b{args.batch}.json"
    path.write_text(json.dumps({"device": device_name, "command": sys.argv, "rows": rows}, indent=2))
    print(f"wrote {path}")
    for row in rows:  # the targets' summary lines, last
        if "paired_ratio_to_limit" in row:
            spread = ", ".join(f"{r:.2f}" for r in row["paired_ratio_to_limit_repeats"])
            low, high = row["paired_ratio_to_limit_range"]
            print(
                f"paired_ratio_to_limit {row['model']} {row['sizes']} K={row['clients']}: "
                f"{row['paired_ratio_to_limit']:.2f} (repeats: {spread}; round pairs {low:.2f}-{high:.2f})"
            )
        if row["sizes"] != "equal":
            continue
        if on_gpu:
            if row["clients"] == 128 and "speedup_vs_flower" in row:
                print(f"speedup_vs_flower gpu K=128: {row['speedup_vs_flower']:.1f}")
            if row["clients"] == 128 and "ratio_to_limit" in row:
                print(f"ratio_to_centralized gpu K=128: {row['ratio_to_limit']:.2f}")
        elif row["model"] == "minilm" and row["clients"] == 32 and "ratio_to_limit" in row:
            spread = ", ".join(f"{r:.2f}" for r in row["ratio_to_limit_repeats"])
            print(f"ratio_to_limit minilm K=32: {row['ratio_to_limit']:.2f} (repeats: {spread})")
        elif row["model"] == "small" and row["clients"] == 512 and "speedup_vs_flower" in row:
            print(f"speedup_vs_flower small K=512: {row['speedup_vs_flower']:.1f}")
        if "ratio_nodes_to_one_process" in row and args.nodes == 2:
            spread = ", ".join(f"{r:.2f}" for r in row["ratio_nodes_to_one_process_repeats"])
            print(
                f"ratio_two_nodes_to_one_process {row['model']} K={row['clients']}: "
                f"{row['ratio_nodes_to_one_process']:.2f} (repeats: {spread})"
            )
        if "ceiling_nodes_to_one_process" in row and args.nodes == 2:
            spread = ", ".join(f"{r:.2f}" for r in row["ceiling_nodes_to_one_process_repeats"])
            print(
                f"ceiling_two_processes_to_one {row['model']} K={row['clients']}: "
                f"{row['ceiling_nodes_to_one_process']:.2f} (repeats: {spread})"
            )
        if row["model"] == "decoder" and "ratio_to_limit" in row:
            print(f"ratio_to_limit decoder{' gpu' if on_gpu else ''} K={row['clients']}: {row['ratio_to_limit']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
