"""The Ray cluster both jobs run on: joining or starting it, and what its nodes hold,
so that a request no node can place fails at once instead of waiting forever."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """What one alive Ray node offers."""

    cpus: int
    gpus: int


def start_ray(address: str | None) -> None:
    """Join the cluster at `address`, else RAY_ADDRESS's or the one a job was submitted
    to, else start a local Ray."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    # Per-block progress bars from every operator drown the jobs' own output.
    ray.data.DataContext.get_current().enable_progress_bars = False


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
