"""benchmarks/gpu_check.py: its arguments, and its CPU fallback end to end with only what a bare GPU machine
has plus the wheels `make gpu-wheels` fetches (the project's other dependencies blocked from import)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

# The lent H200's Python packages, as the device library's KINDS.md lists them (read 2026-11-17).
GPU_IMAGE = {
    "absl-py",
    "accelerate",
    "aiofiles",
    "aiohappyeyeballs",
    "aiohttp",
    "aiosignal",
    "annotated-doc",
    "anyio",
    "attrs",
    "botorch",
    "build",
    "certifi",
    "charset-normalizer",
    "chex",
    "click",
    "cloudpickle",
    "cmake",
    "colorama",
    "contourpy",
    "coverage",
    "cuda-bindings",
    "cuda-core",
    "cuda-pathfinder",
    "cuda-toolkit",
    "cupy-cuda13x",
    "cycler",
    "cython",
    "diffrax",
    "e3nn",
    "einops",
    "equinox",
    "etils",
    "execnet",
    "filelock",
    "flatbuffers",
    "flax",
    "fonttools",
    "formulaic",
    "frozenlist",
    "fsspec",
    "gpytorch",
    "grpcio",
    "h11",
    "h5py",
    "hf-xet",
    "httpcore",
    "httpx",
    "huggingface-hub",
    "humanize",
    "hypothesis",
    "idna",
    "imageio",
    "iniconfig",
    "interface-meta",
    "jax",
    "jax-cuda13-pjrt",
    "jax-cuda13-plugin",
    "jaxlib",
    "jaxtyping",
    "jinja2",
    "joblib",
    "kiwisolver",
    "lazy-loader",
    "lightning",
    "lightning-utilities",
    "linear-operator",
    "lineax",
    "llvmlite",
    "lxml",
    "markdown",
    "markdown-it-py",
    "markupsafe",
    "matplotlib",
    "mdurl",
    "meson",
    "ml-dtypes",
    "mpi4py",
    "mpmath",
    "msgpack",
    "multidict",
    "multipledispatch",
    "mypy-extensions",
    "nanobind",
    "narwhals",
    "networkx",
    "ninja",
    "numba",
    "numba-cuda",
    "numpy",
    "numpyro",
    "nvidia-cublas",
    "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-runtime",
    "nvidia-cudnn-cu13",
    "nvidia-cufft",
    "nvidia-cufile",
    "nvidia-curand",
    "nvidia-cusolver",
    "nvidia-cusparse",
    "nvidia-cusparselt-cu13",
    "nvidia-ml-py",
    "nvidia-nccl-cu13",
    "nvidia-nvjitlink",
    "nvidia-nvshmem-cu13",
    "nvidia-nvtx",
    "onnx",
    "onnx-ir",
    "onnxruntime",
    "onnxscript",
    "opencv-python-headless",
    "optax",
    "opt-einsum",
    "opt-einsum-fx",
    "optimistix",
    "orbax-checkpoint",
    "packaging",
    "pandas",
    "pathspec",
    "patsy",
    "peft",
    "pillow",
    "pip",
    "pluggy",
    "portalocker",
    "prometheus-client",
    "propcache",
    "protobuf",
    "psutil",
    "pyarrow",
    "pybind11",
    "py-cpuinfo",
    "pygments",
    "pyparsing",
    "pyproject-hooks",
    "pyre-extensions",
    "pytest",
    "pytest-benchmark",
    "pytest-cov",
    "pytest-mock",
    "pytest-timeout",
    "pytest-xdist",
    "python-dateutil",
    "pytorch-lightning",
    "pyyaml",
    "regex",
    "requests",
    "rich",
    "sacrebleu",
    "safetensors",
    "scikit-build-core",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "seaborn",
    "sentencepiece",
    "sentence-transformers",
    "setuptools",
    "shellingham",
    "simplejson",
    "six",
    "sortedcontainers",
    "statsmodels",
    "sympy",
    "tabulate",
    "tensorboard",
    "tensorboard-data-server",
    "tensorstore",
    "threadpoolctl",
    "tifffile",
    "tiktoken",
    "timm",
    "tokenizers",
    "toolz",
    "torch",
    "torchaudio",
    "torchdiffeq",
    "torch-geometric",
    "torchmetrics",
    "torchvision",
    "tqdm",
    "transformers",
    "treescope",
    "triton",
    "typer",
    "typing-extensions",
    "typing-inspect",
    "urllib3",
    "uvloop",
    "wadler-lindig",
    "werkzeug",
    "wheel",
    "wrapt",
    "xarray",
    "xxhash",
    "yarl",
    "zipp",
}
# Dependencies of the project that the GPU image lacks and `make gpu-wheels` does not fetch.
ABSENT_THERE = ("flwr", "datasets", "flwr_datasets", "dp_accounting", "ray", "dill", "multiprocess")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sections", "kernels,warp-drive"], "unknown"),
        (["--sections", ","], "none given"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--repeats", "-1"], "--repeats must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_asking_for_cuda_without_one_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.resolve_device("cuda")


def test_cpu_fallback_runs_every_section_without_flower_or_datasets(tmp_path):
    output = tmp_path / "check.json"
    blocker = textwrap.dedent(
        f"""
        import importlib.abc, runpy, sys
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT_THERE!r}:
                    raise ImportError(f"{{name}} is not on the GPU machine")
        sys.meta_path.insert(0, Absent())
        sys.argv = ["gpu_check.py", "--device", "cpu", "--quick", "--clients", "4", "--repeats", "1",
                    "--output", {str(output)!r}]
        try:
            runpy.run_path({str(REPO / "benchmarks" / "gpu_check.py")!r}, run_name="__main__")
        finally:
            import importlib.metadata, json
            owners = importlib.metadata.packages_distributions()
            used = {{top for top in (name.split(".")[0] for name in list(sys.modules)) if top in owners}}
            print("DISTRIBUTIONS " + json.dumps(sorted({{d for top in used for d in owners[top]}})))
        """
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["kernels"]["status"] == "skipped"  # no CUDA here
    assert report["dp_fused"]["status"] == "ok" and report["dp_fused"]["dp_to_plain_time"] > 0
    engine = report["engine"]
    assert engine["status"] == "ok" and engine["examples_per_round"] == 4 * 2 * 8
    assert engine["ratio_to_centralized"] > 0 and engine["speedup_vs_sequential"] > 0
    assert "ratio_to_centralized cpu K=4:" in done.stdout and "speedup_vs_sequential cpu K=4:" in done.stdout
    assert report["environment"]["versions"]["opacus"][0].isdigit()

    # every distribution it imported is on the GPU image or among the wheels `make gpu-wheels` fetches
    imported = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("DISTRIBUTIONS "))[14:])
    makefile = (REPO / "Makefile").read_text()
    specs = next(line for line in makefile.splitlines() if line.startswith("GPU_WHEEL_SPECS")).split("=", 1)[1]
    wheels = {spec.split("==")[0].strip() for spec in specs.split()}
    normal = {name.lower().replace("_", "-") for name in GPU_IMAGE | wheels}
    missing = [d for d in imported if d.lower().replace("_", "-") not in normal and d != "fedlowrank"]
    assert not missing, f"the GPU check imports {missing}: add them to GPU_WHEEL_SPECS in the Makefile"
