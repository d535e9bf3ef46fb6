"""A cohort node: one SuperNode (a real process, or a node of Flower's simulation engine) that hosts many virtual
clients and trains the ones the server samples together, with the batched engine.

Virtual client k lives on cohort node k mod N (``fedlowrank.protocol.cohort_of``), N = the run's
``cohort-nodes``. A node's index is its ``--node-config`` ``cohort-id``, else its ``partition-id`` (Flower's
simulation engine numbers its nodes 0..N-1), and it states N as ``num-cohorts``, else ``num-partitions``. Each
hosted client works in a Context of its own (its partition id) over the node's state: Flower's ``Context.state``
with entries named per client, or the node's ``state-dir`` on disk, keyed per client, which survives a restart.
"""

from __future__ import annotations

from flwr.app import Context

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.protocol import cohort_of
from fedlowrank.protocol.flower import COHORT_ID, NUM_COHORTS


def node_cohort(context: Context, config: RunConfig) -> int:
    """This node's cohort index, checked against the run's number of cohort nodes."""
    node_config = context.node_config
    cohort = node_config.get(COHORT_ID, node_config.get("partition-id"))
    count = node_config.get(NUM_COHORTS, node_config.get("num-partitions"))
    start = f'start each SuperNode with --node-config "{COHORT_ID}=K {NUM_COHORTS}={config.cohort_nodes}"'
    if config.cohort_nodes < 1:
        raise ConfigError(f"this run has no cohort nodes (cohort-nodes = 0), but node {context.node_id} got a cohort")
    if cohort is None or count is None:
        raise ConfigError(f"this SuperNode's --node-config names no {COHORT_ID} and {NUM_COHORTS}: {start}")
    if int(count) != config.cohort_nodes or not 0 <= int(cohort) < int(count):
        raise ConfigError(
            f"this SuperNode says {COHORT_ID}={cohort} of {NUM_COHORTS}={count}, but the run has "
            f"cohort-nodes={config.cohort_nodes}: {start}, K = 0..{config.cohort_nodes - 1}, one node each"
        )
    return int(cohort)


def member_contexts(context: Context, clients: list[int], config: RunConfig) -> list[Context]:
    """A Context per hosted client: the node's, seen as that client's (its partition, the node's state)."""
    cohort = node_cohort(context, config)
    strangers = [c for c in clients if not 0 <= c < config.num_clients or cohort_of(c, config.cohort_nodes) != cohort]
    if strangers:
        raise ConfigError(
            f"cohort node {cohort} was sent client(s) {strangers[:5]} that it does not host (client k lives on node "
            f"k mod {config.cohort_nodes}, of num-clients={config.num_clients})"
        )
    shared = {**context.node_config, "num-partitions": config.num_clients, COHORT_ID: cohort}
    return [
        Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={**shared, "partition-id": c},
            state=context.state,
            run_config=context.run_config,
        )
        for c in clients
    ]
