"""A Ray driver that answers a test's questions about a loopback cluster, one JSON
line in, one JSON line out (after REPLY), on stdin/stdout (tests/loopback.py starts it):

    {"op": "nodes"}                            -> the alive nodes: node_id, head, resources
    {"op": "actors", "node": ID, "state": S}   -> the actors on node ID in state S, from the state API
    {"op": "hold", "node": ID, "cpus": N}      -> an actor pinned to node ID holds N of its CPUs
    {"op": "release"}                          -> that actor is killed: its CPUs are free again

It runs in a process of its own because the test's own process may already hold
another Ray (the suite's), and a `ray list` per question costs seconds of start-up.

    python -m tests.cluster_client GCS_ADDRESS
"""

from __future__ import annotations

import json
import sys

REPLY = "@reply "  # Ray may print its own lines on stdout too


def main(gcs: str) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors

    ray.init(address=gcs, log_to_driver=False)

    @ray.remote
    class Hold:
        def ok(self) -> bool:
            return True

    held = None
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "nodes":
            reply = [
                {
                    "node_id": n["NodeID"],
                    "head": "node:__internal_head__" in n["Resources"],
                    "resources": n["Resources"],
                }
                for n in ray.nodes()
                if n["Alive"]
            ]
        elif op == "actors":
            filters = [("node_id", "=", request["node"]), ("state", "=", request.get("state", "ALIVE"))]
            actors = list_actors(filters=filters, detail=True, limit=10_000, raise_on_missing_output=False)
            reply = [{k: getattr(a, k) for k in ("actor_id", "class_name", "pid", "node_id", "state")} for a in actors]
        elif op == "hold":
            strategy = NodeAffinitySchedulingStrategy(request["node"], soft=False)
            held = Hold.options(num_cpus=request["cpus"], scheduling_strategy=strategy).remote()
            reply = ray.get(held.ok.remote())
        elif op == "release":
            if held is not None:
                ray.kill(held)
            held, reply = None, True
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(REPLY + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
