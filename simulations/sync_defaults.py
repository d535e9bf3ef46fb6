"""Rewrite simulations/default.toml and pyproject's [tool.flwr.app.config] from RunConfig's defaults and every
registered method's option defaults.

Run after adding or changing a config key or a method option: `python simulations/sync_defaults.py`. A test
checks both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fedlowrank.config import RunConfig

REPO = Path(__file__).resolve().parent.parent
HEADER = (
    "# The default run: MiniLM + TREC-6, 10 clients, Dirichlet alpha 0.5, FedAvg-LoRA (FedIT) r = 8.\n"
    "# Every key here is also a --set key (top-level keys as-is, section keys dotted: lora.r, train.lr,\n"
    "# method.fedsvd.period). `fedlowrank keys` says what each one does.\n\n"
)


def default_config() -> RunConfig:
    """RunConfig's defaults with every registered method's options at theirs."""
    from strategies.registry import default_method, option_defaults

    config = RunConfig()
    config.strategy = default_method().name
    config.method = {name: options for name, options in option_defaults().items() if options}
    return config


def flower_app_config() -> str:
    """The [tool.flwr.app.config] tables: every key, flat values (lists as comma strings)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in default_config().to_flat().items():
        section, _, leaf = key.rpartition(".")
        sections.setdefault(section, {})[leaf] = value
    text = "[tool.flwr.app.config]\n" + tomli_w.dumps(sections.pop(""))
    for section, values in sections.items():
        text += f"\n[tool.flwr.app.config.{section}]\n" + tomli_w.dumps(values)
    return text + "\n"


def main() -> None:
    (REPO / "simulations" / "default.toml").write_text(HEADER + default_config().to_toml())
    pyproject = (REPO / "pyproject.toml").read_text()
    start, end = pyproject.index("[tool.flwr.app.config]\n"), pyproject.index("[tool.ruff]")
    (REPO / "pyproject.toml").write_text(pyproject[:start] + flower_app_config() + pyproject[end:])


if __name__ == "__main__":
    main()
