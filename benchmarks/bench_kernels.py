"""Time the multi-client LoRA branch (forward + backward) across implementations; print a table, write JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_kernels.py            # CPU: reference paths only
    .venv/bin/python benchmarks/bench_kernels.py --device cuda --dtype bf16   # GPU: adds the Triton kernels

Implementations (all compute s·B_c(A_c x) for examples of K clients with ragged sizes, then its gradients):
``loop`` one GEMM pair per client over its sorted slice; ``gather_bmm`` the reference BGMV (per-example adapter
copies + bmm, hand-written backward); ``grouped_mm`` torch.nn.functional.grouped_mm over sorted tokens (SGMV);
``triton`` the fused kernels (CUDA only). Also the per-sample gradient norms for DP: ``materialize`` vs ``gram``
(reference) and the Triton kernel. Examples are pre-sorted by client for the segmented paths (sort not timed).
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch
from timing import median_seconds  # benchmarks/timing.py (this script's folder)

from fedlowrank.kernels import multi_lora, multi_lora_forward_segmented, per_sample_grad_norms_sq, sort_by_client
from fedlowrank.kernels import reference as ref
from fedlowrank.kernels.reference import grouped_mm_supported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ragged_sizes(n_clients: int, mean: int, gen: torch.Generator) -> torch.Tensor:
    # Long-tailed client sizes (geometric-like), at least one example each, total ≈ n_clients·mean.
    weights = torch.distributions.Exponential(1.0).sample((n_clients,))
    sizes = (weights / weights.sum() * n_clients * mean).round().long().clamp(min=1)
    return sizes[torch.randperm(n_clients, generator=gen)]


def bench_case(d: int, k_clients: int, r: int, t_len: int, mean: int, dtype, device, repeats: int, triton_ok: bool):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sizes = _ragged_sizes(k_clients, mean, gen)
    n_ex = int(sizes.sum())
    idx = torch.repeat_interleave(torch.arange(k_clients), sizes).to(device)
    perm, offsets = sort_by_client(idx, k_clients)  # already sorted here; kept for clarity
    x = torch.randn(n_ex, t_len, d, device=device, dtype=dtype)
    A = (torch.randn(k_clients, r, d, device=device) / d**0.5).to(dtype)
    B = (torch.randn(k_clients, d, r, device=device) / r**0.5).to(dtype)
    g = torch.randn(n_ex, t_len, d, device=device, dtype=dtype)
    scale = 2.0

    def step(forward):
        def run():
            leaves = [t.detach().requires_grad_(True) for t in (x, A, B)]
            y = forward(*leaves)
            y.backward(g)

        return run

    impls = {
        "loop": step(lambda a, b, c: multi_lora_forward_segmented(a, b, c, offsets, scale, impl="loop")),
        "gather_bmm": step(lambda a, b, c: multi_lora(a, b, c, idx, scale, backend="reference")),
    }
    if grouped_mm_supported(x, A, B) and (r * x.element_size()) % 16 == 0 and (d * x.element_size()) % 16 == 0:
        impls["grouped_mm"] = step(lambda a, b, c: multi_lora_forward_segmented(a, b, c, offsets, scale, "grouped_mm"))
    if triton_ok:
        impls["triton"] = step(lambda a, b, c: multi_lora(a, b, c, idx, scale, backend="triton"))

    norms = {
        "norms_materialize": lambda: ref.per_sample_grad_norms_sq(x, A, B, idx, scale, g, method="materialize"),
        "norms_gram": lambda: ref.per_sample_grad_norms_sq(x, A, B, idx, scale, g, method="gram"),
    }
    if triton_ok:
        norms["norms_triton"] = lambda: per_sample_grad_norms_sq(x, A, B, idx, scale, g, backend="triton")

    row = {"d": d, "K": k_clients, "r": r, "T": t_len, "N": n_ex, "tokens": n_ex * t_len}
    for name, fn in {**impls, **norms}.items():
        row[name] = median_seconds(fn, device, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--dims", default="64,256")
    parser.add_argument("--clients", default="32,128")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per example")
    parser.add_argument("--mean-examples", type=int, default=4, help="mean examples per client (ragged)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    triton_ok = False
    if device.type == "cuda":
        from fedlowrank.kernels import triton_kernels

        triton_ok = triton_kernels.TRITON_AVAILABLE
    else:
        print("Triton timing requires a CUDA GPU: timing the PyTorch reference paths only.")

    rows = []
    for d in (int(v) for v in args.dims.split(",")):
        for k_clients in (int(v) for v in args.clients.split(",")):
            row = bench_case(
                d, k_clients, args.rank, args.tokens, args.mean_examples, dtype, device, args.repeats, triton_ok
            )
            rows.append(row)
            timings = "  ".join(f"{k}={v * 1e3:.2f}ms" for k, v in row.items() if isinstance(v, float))
            print(f"d={d:<5} K={k_clients:<5} N={row['N']:<5} {timings}", flush=True)

    meta = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "what": "median seconds per forward+backward (impls) or per call (norms_*); LoRA branch only, d_in = d_out",
        "args": vars(args),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{device.type}-{args.dtype}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
