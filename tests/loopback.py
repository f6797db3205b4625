"""A real Ray cluster of several nodes on 127.0.0.1, for the tests that need one
(tests/test_cluster.py, tests/test_nodes.py).

Each node is its own `ray start --block` process, in a session of its own, with its own
--temp-dir (two nodes on one host sharing a temp dir would garbage-collect each other's
working_dir packages). The cluster brings its own token (RAY_AUTH_TOKEN, for every
node and client) and its own home folder, so it neither needs nor writes
~/.ray/auth_token. Only the processes it started are ever ended, by process id: `ray
stop` would end every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster_client import REPLY
from tests.conftest import ROOT, process_table

RAY = str(Path(sys.executable).with_name("ray"))
STARTUP_S = 600  # for a node to come up on 2 loaded cores (seen: over 3 minutes for the head's job agent)
_clusters = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str = "the cluster did not come up", every: float = 2):
    deadline = time.time() + timeout
    while not (found := condition()):
        assert time.time() < deadline, what
        time.sleep(every)
    return found


class LoopbackCluster:
    """Nodes started and killed one by one. `env` is what every node and client gets."""

    def __init__(self, home: Path):
        # Short: Ray's socket paths must stay under 107 bytes.
        self.base = f"/tmp/fv-ray-{os.getpid()}-{next(_clusters)}"
        self.port, self.dashboard = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.home = home
        self.env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env.pop("RAY_ADDRESS", None)
        # Ray Train's workers look for the state API on their machine, which holds other
        # Ray instances here (the suite's, other users'): name the cluster's dashboard.
        self.env["RAY_API_SERVER_ADDRESS"] = self.address
        self.nodes: dict[str, subprocess.Popen] = {}
        self.client: subprocess.Popen | None = None
        self.jobs: dict[str, subprocess.Popen] = {}  # submission id -> its `ray job submit`
        self._args: dict[str, list[str]] = {}

    # --- nodes -------------------------------------------------------------------------

    def temp_dir(self, name: str) -> str:
        return f"{self.base}-{name}"

    def start_head(self, cpus: int = 2) -> None:
        self._start(
            "head",
            ["--head", f"--port={self.port}", f"--num-cpus={cpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}"],
        )  # fmt: skip
        wait_for(lambda: self.ray("job", "list", "--address", self.address).returncode == 0, STARTUP_S)
        # The dashboard answers before its job agent can take jobs ("No available agent").
        wait_for(lambda: self.ray("job", "submit", "--no-wait", "--address", self.address, "--", "true").returncode == 0,
                 STARTUP_S)  # fmt: skip
        # Started while the head is the only node, so that it is attached to the head's raylet.
        self.client = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_client", self.gcs],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self._reply() == {"ready": True}

    def add_node(self, name: str, cpus: int = 2, wait: bool = True) -> None:
        """A worker node with `cpus` CPUs and a resource named after it (fv_<name>);
        with wait=False, call joined(name) before relying on it."""
        self._start(name, [f"--address={self.gcs}", f"--num-cpus={cpus}", f'--resources={{"fv_{name}": 1}}'])
        if wait:
            self.joined(name)

    def joined(self, name: str) -> str:
        """The node's id once it has joined. A node whose raylet gave up while starting is
        started again: on a loaded machine its dashboard agent can take longer to come up
        than the raylet waits for it (seen: "Timed out waiting for file ...
        dashboard_agent_listen_port_...", and `ray start --block` exits)."""
        deadline = time.time() + STARTUP_S
        while not (node := self.node_id(name)):
            if self.nodes[name].poll() is not None:
                self.kill_node(name)
                self._start(name, self._args[name])
            assert time.time() < deadline, f"node {name} did not join"
            time.sleep(2)
        return node

    def _start(self, name: str, args: list[str]) -> None:
        self._args[name] = args
        # Ports of their own: a node's agents otherwise take Ray's fixed defaults (52365,
        # ...), which another Ray on this machine may hold; its agent then never serves.
        ports = [
            f"--{flag}={free_port()}"
            for flag in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "metrics-export-port",
                "runtime-env-agent-port",
            )
        ]
        if name == "head":
            ports.append(f"--ray-client-server-port={free_port()}")
        self.nodes[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir(name)}", *ports, *args],
            env=self.env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def node_id(self, name: str) -> str | None:
        """The alive node started as `name` (None if there is none)."""
        for node in self.ask("nodes"):
            if (name == "head" and node["head"]) or f"fv_{name}" in node["resources"]:
                return node["node_id"]
        return None

    def processes(self, name: str) -> list[int]:
        """The node's processes: its `ray start`, those started with its temp dir (the
        raylet first), and everything they started (the workers, renamed `ray::...`)."""
        marker = self.temp_dir(name) + "/"
        table = process_table()
        own = [pid for pid, (_, cmd) in table.items() if marker in cmd]
        own.sort(key=lambda pid: "raylet" not in table[pid][1])
        found = [self.nodes[name].pid, *own]
        todo = list(found)
        while todo:
            parent = todo.pop()
            children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in found]
            found.extend(children)
            todo.extend(children)
        return found

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's raylet and every process of the node, by process id, as
        a machine that vanishes: nothing is told, nothing is cleaned up."""
        victims = [pid for pid in self.processes(name)[1:] if pid != self.nodes[name].pid]
        victims.append(self.nodes[name].pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.nodes[name].wait(timeout=30)
        return victims

    def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.client.pid, signal.SIGKILL)
            self.client.wait(timeout=30)
        # Killed, not stopped: the cluster is thrown away with its temp dirs, and a
        # graceful `ray start` exit waited up to 20 s a node (31 s of test_cluster's teardown).
        for name in reversed(list(self.nodes)):
            if self.nodes[name].poll() is None:
                self.kill_node(name)
        _kill_leftovers(self.base)
        for name in self.nodes:  # each node's session folder, in /tmp for short socket paths
            shutil.rmtree(self.temp_dir(name), ignore_errors=True)

    # --- clients -------------------------------------------------------------------------

    def ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def ask(self, op: str, **args):
        """A question for the cluster's client driver (tests/cluster_client.py)."""
        self.client.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.client.stdin.flush()
        return self._reply()

    def _reply(self):
        while line := self.client.stdout.readline():
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise AssertionError("the cluster client died")

    def actors_on(self, node_id: str, class_prefix: str = "", state: str = "ALIVE") -> list[dict]:
        """The actors on the node whose class name starts with class_prefix, from Ray's state API."""
        return [a for a in self.ask("actors", node=node_id, state=state) if a["class_name"].startswith(class_prefix)]

    def hold_cpus(self, name: str, cpus: int) -> None:
        """An actor pinned to node `name` takes `cpus` of its CPUs until release_cpus()."""
        assert self.ask("hold", node=self.node_id(name), cpus=cpus) is True

    def release_cpus(self) -> None:
        assert self.ask("release") is True

    def submit(self, *entrypoint: str, log: Path) -> subprocess.Popen:
        """`ray job submit` in the background: it prints the job's output to `log` and
        exits with the job's success."""
        job_id = f"fv-test-{secrets.token_hex(4)}"
        with open(log, "w") as f:
            self.jobs[job_id] = subprocess.Popen(
                [RAY, "job", "submit", "--address", self.address, "--submission-id", job_id,
                 "--working-dir", str(ROOT), "--", *entrypoint],
                cwd=ROOT,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self.jobs[job_id]

    def stop_jobs(self) -> None:
        """Stop every submitted job still running (`ray job stop` waits for it to end)."""
        for job_id, client in self.jobs.items():
            if client.poll() is None:
                self.ray("job", "stop", "--address", self.address, job_id)
                client.kill()
                client.wait(timeout=30)
        self.jobs.clear()


def _kill_leftovers(marker: str) -> None:
    for pid, (_, cmdline) in process_table().items():
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
