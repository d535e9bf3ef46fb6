"""Rewrite simulations/default.toml and pyproject's [tool.flwr.app.config] from RunConfig's defaults.

Run after adding or changing a config key: `python simulations/sync_defaults.py`. A test checks both files.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedlowrank.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
HEADER = (
    "# The default run: MiniLM + TREC-6, 10 clients, Dirichlet alpha 0.5, FedAvg-LoRA (FedIT) r = 8.\n"
    "# Every key here is also a --set key (top-level keys as-is, section keys dotted: lora.r, train.lr).\n\n"
)


def flower_app_config() -> str:
    """The [tool.flwr.app.config] tables: every key, flat values (lists as comma strings)."""
    flat = RunConfig().to_flat()
    sections: dict[str, dict] = {}
    for key, value in flat.items():
        if "." in key:
            section, leaf = key.split(".", 1)
            sections.setdefault(section, {})[leaf] = value
    text = "[tool.flwr.app.config]\n" + tomli_w.dumps({k: v for k, v in flat.items() if "." not in k})
    for section, values in sections.items():
        text += f"\n[tool.flwr.app.config.{section}]\n" + tomli_w.dumps(values)
    return text + "\n"


def main() -> None:
    (REPO / "simulations" / "default.toml").write_text(HEADER + RunConfig().to_toml())
    pyproject = (REPO / "pyproject.toml").read_text()
    start, end = pyproject.index("[tool.flwr.app.config]\n"), pyproject.index("[tool.ruff]")
    (REPO / "pyproject.toml").write_text(pyproject[:start] + flower_app_config() + pyproject[end:])


if __name__ == "__main__":
    main()
