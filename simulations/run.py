"""``fedlowrank simulate``: a federation in this process, with the ServerApp's loop and the ClientApp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.client_app import make_client_app
from fedlowrank.config import RunConfig
from fedlowrank.progress import Reporter
from fedlowrank.protocol.flower import clients_trained
from simulations.grids import BatchedGrid, InProcessGrid, adopt_server_identity
from strategies.server_app import run_server


def quiet_flower() -> None:
    """Flower's logger says INFO for every message of every round; a simulation's progress bar says enough."""
    import logging

    import flwr.common.logger  # noqa: F401  (configures its logger on import: quiet it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)


def virtual_node_config(config: RunConfig) -> dict[str, Any]:
    """What each virtual SuperNode is started with besides its partition: its state folder on disk (unless the
    run keeps client state in Flower's Context), so a killed simulation can be resumed."""
    if config.client_state == "context":
        return {}
    return {"state-dir": config.client_state_dir or str(Path(config.output_dir) / config.name / "client-state")}


def run_inprocess(config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run a federated simulation of ``config`` in this process; returns the run summary."""
    reporter = reporter or Reporter()
    adopt_server_identity()
    arguments: dict[str, Any] = dict(
        num_nodes=config.cohort_nodes or config.num_clients,  # cohort nodes: each hosts its share of the clients
        run_config=config.to_flat(),
        on_reply=lambda reply: reporter.client_finished(clients_trained(reply)),
        seed=config.seed,
        node_config=virtual_node_config(config),
    )
    if config.engine == "batched":
        grid = BatchedGrid(make_client_app(config), bound_config=config, wave_size=config.engine_wave_size, **arguments)
    else:
        grid = InProcessGrid(make_client_app(config), **arguments)
    return run_server(grid, config, reporter)
