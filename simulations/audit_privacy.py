"""``fedlowrank audit privacy``: the one-run audit of every client's DP-SGD schedule under a run config.

Each client's schedule (its q = b / n_k, its σ from the budget, the run's steps) is audited with gradient canaries
through the mechanism the clients use; the empirical lower bound is reported beside the accountant's ε. A lower
bound above the accounted ε means the mechanism leaks more than it claims.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlowrank.checkpoint import write_atomic
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.privacy.accounting import plan_for_run
from fedlowrank.privacy.audit import AuditResult, audit_dp_sgd
from fedlowrank.runtime import client_partitions, load_run_task


def client_train_sizes(config: RunConfig) -> list[int]:
    """How many training examples each client holds under ``config`` (no model is loaded)."""
    return [len(split.train) for split in client_partitions(config, load_run_task(config))]


def audit_clients(
    config: RunConfig,
    *,
    canaries: int,
    confidence: float,
    mechanism: str,
    clients: list[int] | None = None,
    disable_noise: bool = False,
) -> dict[int, AuditResult]:
    """Audit the DP-SGD schedule of each client in ``clients`` (default: all)."""
    if not config.dp.sample_level:
        raise ConfigError("the run config has no sample-level DP to audit: set dp.epsilon (e.g. --set dp.epsilon=3)")
    sizes = client_train_sizes(config)
    chosen = list(range(config.num_clients)) if clients is None else clients
    outside = [k for k in chosen if not 0 <= k < config.num_clients]
    if outside:
        raise ConfigError(f"client(s) {outside} are outside 0..{config.num_clients - 1}")
    return {
        k: audit_dp_sgd(
            plan_for_run(config, sizes[k]),
            sizes[k],
            max_grad_norm=config.dp.max_grad_norm,
            canaries=canaries,
            confidence=confidence,
            mechanism=mechanism,
            seed=config.seed + k,
            disable_noise=disable_noise,
        )
        for k in chosen
    }


def audit_table(results: dict[int, AuditResult]) -> str:
    """A markdown table: one row per client, the lower bound beside the accounted ε."""
    first = next(iter(results.values()))
    lines = [
        f"One-run privacy audit ({first.canaries} gradient canaries, {first.mechanism} mechanism, "
        f"δ = {first.delta:g}, lower bounds at {first.confidence:.0%} confidence)",
        "",
        "| client | ε lower bound | ε accounted | guesses | correct | σ | q | steps | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, r in results.items():
        verdict = "LEAKS MORE THAN CLAIMED" if r.epsilon_lower_bound > r.epsilon_accounted else "consistent"
        lines.append(
            f"| {k} | {r.epsilon_lower_bound:.3f} | {r.epsilon_accounted:.3f} | {r.guesses} | {r.correct} | "
            f"{r.noise_multiplier:.4g} | {r.sample_rate:.4g} | {r.steps} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def save_audit(results: dict[int, AuditResult], output: Path, command: str) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``audit.md`` (with the command that made them) into ``output``."""
    payload = {"command": command, "clients": {str(k): r.as_dict() for k, r in results.items()}}
    json_path, table_path = output / "audit.json", output / "audit.md"
    write_atomic(json_path, lambda target: target.write_text(json.dumps(payload, indent=2)))
    text = f"{audit_table(results)}\nCommand: `{command}`\n"
    write_atomic(table_path, lambda target: target.write_text(text))
    return json_path, table_path
