"""The Ray cluster both jobs run on: joining or starting it, and what its nodes hold,
so that a request no node can place fails at once instead of waiting forever."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """What one alive Ray node offers."""

    cpus: int
    gpus: int


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, else RAY_ADDRESS's or the one a job was submitted
    to, else start a local Ray."""
    import logging

    import ray

    if not ray.is_initialized():
        # Ray Train's workers find the state API by looking for Ray on the machine, which
        # fails when a machine runs two (a test's Ray beside yours, two users' jobs): a
        # stopped trial's CPUs are then never freed and the next trials wait forever
        # (seen with Ray 2.60). A local Ray's workers inherit this process's environment,
        # so name its dashboard for them; a cluster we only join keeps its own.
        port = _free_port()
        ours = "RAY_API_SERVER_ADDRESS" not in os.environ
        if ours:
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        context = ray.init(address=address, log_to_driver=True, dashboard_port=port)
        if ours and not str(context.dashboard_url or "").endswith(f":{port}"):
            del os.environ["RAY_API_SERVER_ADDRESS"]  # joined a cluster: its dashboard is elsewhere
    # Ray Data's per-operator progress bars and execution-plan INFO lines drown the jobs'
    # own progress and epoch lines; its warnings still show.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_nodes() -> list[Node]:
    import ray

    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            r = n.get("Resources", {})
            nodes.append(Node(cpus=int(r.get("CPU", 0)), gpus=int(r.get("GPU", 0))))
    return nodes


def placeable(nodes: list[Node], cpus: int, gpus: int = 0) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs each the nodes hold at once."""
    return sum(min(n.cpus // cpus if cpus else n.gpus, n.gpus // gpus if gpus else n.cpus // cpus) for n in nodes)


def describe(nodes: list[Node]) -> str:
    """e.g. "2 node(s): 2 CPU, 8 CPU + 1 GPU", for error messages."""
    if not nodes:
        return "no alive nodes"
    return f"{len(nodes)} node(s): " + ", ".join(
        f"{n.cpus} CPU" + (f" + {n.gpus} GPU" if n.gpus else "") for n in nodes
    )
