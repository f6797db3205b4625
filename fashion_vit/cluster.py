"""The Ray cluster both jobs run on: joining or starting it, what its nodes hold (so
that a request no node can place fails at once instead of waiting forever), and
whether a folder the job keeps its state in is seen by every node."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """What one alive Ray node offers."""

    cpus: int
    gpus: int


def start_ray(address: str | None, **local) -> None:
    """Join the cluster at `address`, else RAY_ADDRESS's or the one a job was submitted
    to, else start a local Ray (`local`: more of ray.init's arguments, such as num_cpus)."""
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
        # ray.init sets a SIGTERM handler of its own (sys.exit(15)), in place of the one a
        # job installed to save its work on a preemption notice (preemption.py): keep ours.
        handler = signal.getsignal(signal.SIGTERM)
        context = ray.init(address=address, log_to_driver=True, dashboard_port=port, **local)
        if handler not in (signal.SIG_DFL, None) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)
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


PROBE_TIMEOUT_S = 30  # a node that has not answered by then is left out of the warning


def warn_if_not_shared(write: list[tuple[str, str]], read: Sequence[tuple[str, str]] = (), warn=None) -> None:
    """On a multi-node cluster, one line on stderr for each local path that some other
    alive node cannot see. write: (flag, folder) pairs the job's workers write and that
    must outlive any node (created here), each probed with a marker file this driver
    writes there; read: (flag, folder) pairs the workers read, probed by their existence.
    URIs are taken as shared. A zero-CPU task pinned to each other node looks; a node
    that does not answer within PROBE_TIMEOUT_S is left out."""
    import sys
    import uuid

    import ray

    from fashion_vit.files import is_uri

    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    here = ray.get_runtime_context().get_node_id()
    others = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here}
    write = [(flag, p) for flag, p in write if p and not is_uri(p)]
    read = [(flag, p) for flag, p in read if p and not is_uri(p)]
    if not others or not (write or read):
        return
    token = uuid.uuid4().hex
    markers = []
    for _, path in write:
        os.makedirs(path, exist_ok=True)
        markers.append(os.path.join(os.path.abspath(path), f".fashion-vit-shared-{token}"))
        open(markers[-1], "w").close()
    try:
        missing = _not_seen(others, [*markers, *(os.path.abspath(p) for _, p in read)])
    finally:
        for marker in markers:
            with contextlib.suppress(OSError):
                os.remove(marker)
    for line in unshared_warnings([*write, *read], missing, len(others) + 1):
        warn(line)


def unshared_warnings(given: list[tuple[str, str]], missing: list[list[str]], nodes: int) -> list[str]:
    """One line per (flag, path) in `given` that some nodes cannot see: missing[i], the
    addresses of the nodes that cannot see the i-th; nodes: the cluster's node count."""
    return [
        f"warning: {flag} {path} is on this node's disk only: {len(unseen)} of the cluster's {nodes} nodes "
        f"cannot see it ({', '.join(sorted(set(unseen)))}); what is kept there is lost with this node, and the "
        "others cannot use it (use a shared filesystem, or a URI)"
        for (flag, path), unseen in zip(given, missing, strict=True)
        if unseen
    ]


def _not_seen(nodes: dict[str, str], paths: list[str]) -> list[list[str]]:
    """For each path, the addresses of the nodes (node id -> address) on which it does
    not exist; a node that does not answer within PROBE_TIMEOUT_S is not counted."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    exists = ray.remote(num_cpus=0, max_retries=0)(_exist)
    refs = {
        exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(paths): address
        for node, address in nodes.items()
    }
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    missing: list[list[str]] = [[] for _ in paths]
    for ref in ready:
        try:
            seen = ray.get(ref)
        except ray.exceptions.RayError:  # the node went away meanwhile
            continue
        for unseen, ok in zip(missing, seen, strict=True):
            if not ok:
                unseen.append(refs[ref])
    return missing


def _exist(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]
