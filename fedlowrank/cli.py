"""The ``fedlowrank`` command line: ``simulate`` (federated, in-process), ``train`` (centralized), ``bench``,
``sweep`` and ``keys``.

The composition root: the commands that run federations import ``simulations/`` and ``strategies/`` (and so
Flower) inside their bodies, so the core library stays free of both.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlowrank.config import ConfigError, RunConfig, parse_overrides

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated low-rank fine-tuning.")
console = Console()

SIMULATIONS_DIR = Path(__file__).resolve().parent.parent / "simulations"

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML run config (default: simulations/default.toml).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key, e.g. --set num-rounds=3 --set lora.r=4 (repeatable)."),
]
DataDirOption = Annotated[
    str | None, typer.Option("--data-dir", help="Folder with local datasets (default: $FEDLOWRANK_DATA).")
]
NameOption = Annotated[str | None, typer.Option("--name", help="Run name: output goes to <output-dir>/<name>/.")]
ResumeOption = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue the run in this folder (runs/<name>) from its last checkpoint."),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing run of the same name (deleted first).")
]


def load_config(
    config_path: Path | None, overrides: list[str] | None, data_dir: str | None, name: str | None
) -> RunConfig:
    extra = list(overrides or [])
    if data_dir:
        extra.append(f"data-dir={_toml_string(data_dir)}")
    if name:
        extra.append(f"name={_toml_string(name)}")
    if config_path is None:
        default = SIMULATIONS_DIR / "default.toml"
        if default.is_file():
            return RunConfig.from_toml(default, extra)
        return RunConfig.from_flat(parse_overrides(extra))
    return RunConfig.from_toml(config_path, extra)


def resumed_config(run_dir: Path, overrides: list[str] | None) -> RunConfig:
    """The saved config of the run in ``run_dir``, to continue it (``--set`` may change e.g. num-rounds)."""
    saved = run_dir / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it holds no run (no config.toml)")
    config = RunConfig.from_toml(saved, [*(overrides or []), "resume=true", "overwrite=false"])
    config.output_dir, config.name = str(run_dir.parent), run_dir.name
    return config


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Bad input (config, data, model, adapter) ends the command with its message and exit code 2."""
    from fedlowrank.errors import USER_ERRORS

    try:
        yield
    except (*USER_ERRORS, *extra) as exc:
        _fail(str(exc))
    except RuntimeError as exc:  # the federation could not go on (FederationError): its message, exit code 1
        if type(exc).__name__ != "FederationError":
            raise
        console.print(f"[bold red]stopped:[/] {exc}")
        raise typer.Exit(code=1) from exc


def _command_line() -> str:
    """The running command, rebuilt from its parsed options (saved beside the results it makes)."""
    context = click.get_current_context()
    words = ["fedlowrank", *context.command_path.split()[1:]]
    for param in context.command.params:
        value = context.params.get(param.name or "")
        if not isinstance(param, click.Option) or value in (None, [], ()) or value == param.default:
            continue
        if param.is_flag:
            words += [param.opts[0]] if value else []
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [param.opts[0], str(item)]
    return shlex.join(words)


def _quiet_libraries(flower: bool = True) -> None:

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if flower:
        from simulations.run import quiet_flower

        quiet_flower()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _execute(
    config_path: Path | None, overrides: list[str] | None, data_dir: str | None, name: str | None, run: Any
) -> None:
    """Load the config (bad input: its message, exit code 2) and run ``run(config, reporter)``."""
    from fedlowrank.progress import RichReporter

    with user_errors():
        run(load_config(config_path, overrides, data_dir, name), RichReporter(console))


@app.command()
def simulate(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    name: NameOption = None,
    resume: ResumeOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Run a federated simulation in this process (Flower strategies and ClientApp, no Ray)."""
    from fedlowrank.progress import RichReporter

    with user_errors():
        if resume is not None:
            run_config = resumed_config(resume, set_)
        else:
            run_config = load_config(
                config, [*(set_ or []), *(["overwrite=true"] if overwrite else [])], data_dir, name
            )
        _simulate(run_config, RichReporter(console))


def _simulate(run_config: RunConfig, reporter: Any) -> None:
    from strategies.registry import resolve_method

    resolve_method(run_config)  # every method-specific check before anything loads
    _quiet_libraries()
    from simulations.run import run_inprocess

    run_inprocess(run_config, reporter)


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    name: NameOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Centralized LoRA fine-tuning on the whole training set (the upper bound for federated runs)."""
    overrides = [*(set_ or []), *(["overwrite=true"] if overwrite else [])]
    _execute(config, overrides, data_dir, name, lambda run_config, reporter: _train(run_config, reporter, name is None))


def _train(run_config: RunConfig, reporter: Any, default_name: bool) -> None:
    from fedlowrank.centralized import train_centralized

    if default_name:
        run_config.name = f"{run_config.name}-centralized"
    _quiet_libraries(flower=False)
    train_centralized(run_config, reporter)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that run federations (results saved to disk).")
app.add_typer(bench_app, name="bench")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _all_strategies() -> str:
    from strategies.registry import method_names

    return ",".join(method_names())


@contextmanager
def _sweep_progress(label: str, total: int) -> Iterator[Any]:
    """A progress bar over a sweep's cells; yields the ``on_cell`` callback the sweep helper calls."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task("", total=total)
        yield lambda done, total, cell: progress.update(task, completed=done, total=total, description=cell.name)


# fmt: off
@bench_app.command("bias")
def bench_bias(
    config: ConfigOption = None, set_: SetOption = None, data_dir: DataDirOption = None,
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies (default: all but fed-galore).")] = "",
    alphas: Annotated[str, typer.Option(help="Dirichlet α values and/or 'iid'.")] = "0.1,0.5,1.0,iid",
    local_steps: Annotated[str, typer.Option(help="Local steps per round (comma-separated).")] = "5,20",
    seeds: Annotated[str, typer.Option(help="Seeds (comma-separated).")] = "0",
    output: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("runs/bench-bias"),
) -> None:  # fmt: on
    """Aggregation bias per round and layer, and accuracy, for strategies x heterogeneity x local steps."""
    with user_errors(ValueError):
        base = load_config(config, set_, data_dir, None)
        names = _csv(strategies) or [n for n in _csv(_all_strategies()) if _trains_factors(n)]
        steps = [int(v) for v in _csv(local_steps)]
        seed_values = [int(v) for v in _csv(seeds)]
        _quiet_libraries()
        from simulations.bench_bias import run_bias_benchmark

        total = len(names) * len(_csv(alphas)) * len(steps) * len(seed_values)
        from simulations.sweep import SweepRun

        with _sweep_progress("bench bias", total) as advance:
            run_bias_benchmark(base, names, _csv(alphas), steps, seed_values, SweepRun(output, on_cell=advance))
        console.print((output / "bias_summary.md").read_text())
        console.print((output / "accuracy.md").read_text())
        console.print(f"wrote {output}/bias.csv, bias.png, accuracy.md, accuracy.csv, bias_summary.md")


def _trains_factors(name: str) -> bool:
    from strategies.registry import get_method

    return get_method(name).spec.trains_factors


sweep_app = typer.Typer(no_args_is_help=True, help="Parameter sweeps that run federations (resumable).")
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("privacy")
def sweep_privacy(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    epsilons: Annotated[str, typer.Option(help="Sample-level ε values; 'inf' = no DP.")] = "1,3,6,inf",
    strategies: Annotated[str, typer.Option(help="Comma-separated strategies.")] = "fedit,ffa,fedsvd",
    seeds: Annotated[int, typer.Option(help="Number of seeds (0, 1, ..., N-1).")] = 3,
    method_set: Annotated[
        list[str] | None,
        typer.Option(
            "--method-set", help="One method's own setting, METHOD:KEY=VALUE, e.g. ffa:lora.alpha=64 (repeatable)."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("runs/sweep-privacy"),
) -> None:
    """Accuracy against the privacy budget: strategies x ε x seeds, with a CSV, a table and a plot."""
    with user_errors(ValueError):
        base = load_config(config, set_, data_dir, None)
        _quiet_libraries()
        from simulations.sweep_privacy import parse_epsilons, parse_method_settings, run_privacy_sweep

        eps_values = parse_epsilons(epsilons)
        if seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        settings = parse_method_settings(list(method_set or []))
        from simulations.sweep import SweepRun

        with _sweep_progress("sweep privacy", len(_csv(strategies)) * len(eps_values) * seeds) as advance:
            run_privacy_sweep(
                base, _csv(strategies), eps_values, list(range(seeds)), SweepRun(output, on_cell=advance),
                method_settings=settings, command=_command_line(),
            )  # fmt: skip
        console.print((output / "privacy.md").read_text())
        console.print(f"wrote {output}/privacy.csv, privacy.md, privacy.png")


COMPARED_METHODS = "fedit,ffa,fedsvd,lora-fair,fedsa,fedex"


@app.command()
def compare(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    strategies: Annotated[str, typer.Option(help="Comma-separated methods.")] = COMPARED_METHODS,
    seeds: Annotated[int, typer.Option(help="Seeds of the final runs (0, 1, ..., N-1); at least 5 to report.")] = 5,
    lrs: Annotated[str, typer.Option(help="Learning-rate grid tuned on validation data.")] = "0.001,0.003,0.01",
    tune_rounds: Annotated[int, typer.Option(help="Rounds of each tuning run (one seed).")] = 2,
    reference: Annotated[str, typer.Option(help="The method every other one is compared with (paired).")] = "fedit",
    output: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("runs/compare"),
) -> None:
    """Tune each method on the clients' validation splits, run the winners on every seed, and report test
    accuracy with 95 % intervals and a paired test against the reference (table, CSV and plot)."""
    with user_errors(ValueError):
        base = load_config(config, set_, data_dir, None)
        _quiet_libraries()
        from simulations.compare import run_comparison
        from simulations.sweep import SweepRun

        if seeds < 2 or tune_rounds < 1:
            raise ConfigError("--seeds must be >= 2 and --tune-rounds >= 1")
        grid = [float(x) for x in _csv(lrs)]
        command = _command_line()
        methods = _csv(strategies)
        with _sweep_progress("compare", 0) as advance:
            run_comparison(
                base, methods, list(range(seeds)), SweepRun(output, on_cell=advance), lrs=grid,
                tune_rounds=tune_rounds, reference=reference, command=command,
            )  # fmt: skip
    console.print((output / "compare.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {output}/compare.md, compare.csv, tuning.csv, compare.png")


@app.command("tune")
def tune_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    lrs: Annotated[str, typer.Option(help="Learning rates to try.")] = "0.0003,0.001,0.003,0.01",
    tune_rounds: Annotated[int, typer.Option(help="Rounds of each short run.")] = 2,
    output: Annotated[Path, typer.Option(help="Output folder (resumable).")] = Path("runs/tune"),
) -> None:
    """Find a learning rate that works for the config's method and data, on the clients' validation splits
    (never the test set): one short run per value, the best one printed and saved in tuning.csv."""
    with user_errors(ValueError):
        base = load_config(config, set_, data_dir, None)
        _quiet_libraries()
        from simulations.compare import tune
        from simulations.sweep import SweepRun, markdown_table, write_csv
        from strategies.registry import resolve_method

        if tune_rounds < 1:
            raise ConfigError("--tune-rounds must be >= 1")
        method = resolve_method(base).name
        grid = [float(x) for x in _csv(lrs)]
        with _sweep_progress("tune", 0) as advance:
            best, rows = tune(base, method, grid, tune_rounds, base.seed, SweepRun(output, on_cell=advance))
        write_csv(rows, output / "tuning.csv")
    header = [key for key in rows[0] if key != "method"]
    console.print(markdown_table(header, [[row[key] for key in header] for row in rows]), markup=False)
    console.print(f"best on validation: {', '.join(f'{k}={v:g}' for k, v in best.items())} (wrote {output}/tuning.csv)")


audit_app = typer.Typer(no_args_is_help=True, help="Empirical checks of the privacy claims.")
app.add_typer(audit_app, name="audit")


@audit_app.command("privacy")
def audit_privacy(
    config: ConfigOption = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    canaries: Annotated[int, typer.Option(help="Gradient canaries (each included with probability 1/2).")] = 1000,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound.")] = 0.95,
    mechanism: Annotated[
        str, typer.Option(help="'opacus' (DP-SGD clients) or 'engine' (the batched engine's clip-and-noise).")
    ] = "opacus",
    client: Annotated[list[int] | None, typer.Option(help="Audit only these clients (repeatable).")] = None,
    output: Annotated[Path, typer.Option(help="Folder for audit.json and audit.md.")] = Path("runs/audit-privacy"),
    without_noise: Annotated[
        bool, typer.Option("--test-without-noise", hidden=True, help="Test only: a mechanism that adds no noise.")
    ] = False,
) -> None:
    """A lower bound on each client's ε from one DP-SGD run with canaries (Steinke, Nasr and Jagielski 2023),
    beside the accountant's ε: a bound above it means the mechanism leaks more than it claims."""
    from simulations.audit_privacy import audit_clients, audit_table, save_audit

    with user_errors(ValueError):
        base = load_config(config, set_, data_dir, None)
        _quiet_libraries(flower=False)
        results = audit_clients(
            base, canaries=canaries, confidence=confidence, mechanism=mechanism, clients=client,
            disable_noise=without_noise,
        )  # fmt: skip
    command = _command_line()
    json_path, table_path = save_audit(results, output, command)
    console.print(audit_table(results), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {json_path} and {table_path}")
    if any(r.epsilon_lower_bound > r.epsilon_accounted for r in results.values()):
        console.print("[bold red]the audit found more leakage than the accountant claims[/]")
        raise typer.Exit(code=1)


deploy_app = typer.Typer(no_args_is_help=True, help="Secure deployment on real SuperLink and SuperNodes.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("certs")
def deploy_certs(
    output: Annotated[Path, typer.Option(help="Folder for the CA, the SuperLink certificate and node keys.")] = Path(
        "certs"
    ),
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make (one per node).")] = 2,
    host: Annotated[
        list[str] | None, typer.Option(help="Name or IP the SuperLink is reached at (repeatable; default: localhost).")
    ] = None,
    address: Annotated[str, typer.Option(help="host:port the SuperNodes and flwr connect to.")] = "127.0.0.1:8000",
    overwrite: OverwriteOption = False,
) -> None:
    """A development CA, a TLS certificate for the SuperLink and one authentication key pair per SuperNode,
    with the commands that use them (TLS + SuperNode authentication)."""
    from fedlowrank.deploy import DEFAULT_HOSTS, deployment_commands, make_certificates

    with user_errors():
        files = make_certificates(output, nodes, tuple(host or DEFAULT_HOSTS), overwrite=overwrite)
    console.print(f"wrote {files.ca_certificate}, {files.server_certificate} and {nodes} node key pair(s) in {output}")
    console.print(deployment_commands(files, address), highlight=False, soft_wrap=True, markup=False)


@app.command("keys")
def list_keys(set_: SetOption = None) -> None:
    """List every config key with its default and what it does (method options included; --set
    method-modules=... to see your own methods' too)."""
    from fedlowrank.config import key_help
    from strategies.registry import load_method_modules, option_help

    with user_errors():
        overrides = parse_overrides(list(set_ or []))
        load_method_modules(RunConfig.from_flat(overrides).method_modules)
    helps = key_help()
    for key, value in RunConfig().to_flat().items():
        console.print(f"{key} = {value!r}  [dim]# {helps.get(key, '')}[/]", highlight=False)
    for key, (default, text) in option_help().items():
        console.print(f"{key} = {default!r}  [dim]# {text}[/]", highlight=False)


# typer maps the parameter name set_ to --set; keep the public option name stable.
if __name__ == "__main__":
    app()
