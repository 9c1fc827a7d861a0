"""A Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`), in a process of its own.

    python tests/ray_cluster_child.py        prints `address HOST:PORT`, then obeys stdin, a line at a time:
        remove-worker     remove the worker node at once (as a machine that is lost), print `removed`
        worker-tasks      print how many shard tasks the worker node runs now
        add-worker        start a new worker node (after a removal), print `added` once it is up
        quit              stop the cluster and exit

The head node has one CPU and the worker node two, so a job's shard tasks run on both. Nodes are
declared dead a few seconds after they stop answering (not the default minute). Each node is a set of
processes started from this one, with its environment: the S3 variables the test set reach every task.

This process adopts the processes its nodes leave behind (it is their subreaper: a node removed by
force leaves its workers running, as a lost machine would not) and ends them all before it exits, so
no test after it meets a process of this cluster.

Every node listens on 127.0.0.1 only. Ray takes 127.0.0.1 for the machine's address unless told
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (its switch for clusters that stay on one machine), which
`LOOPBACK_ENV` sets here and in every driver the tests start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK_ENV)  # before Ray is imported: it reads the switch once

from ray.cluster_utils import Cluster  # noqa: E402

HERE = Path(__file__).resolve().parent

FAST_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}


def end_descendants() -> None:
    """End every process below this one (its nodes' and the orphans it adopted), waiting for them first."""
    deadline = time.monotonic() + 20
    while (left := descendants({os.getpid()})) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap the adopted ones that ended
                pass
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class ClusterProcess:
    """This script as a child process with the environment `env` (its nodes' processes inherit it):
    `address` to join, `command(line)` for its answer."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "ray_cluster_child.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("address "), line
        self.address = line.split()[1]

    def command(self, text: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def descendants(roots: set[int]) -> set[int]:
    """The processes under `roots` (their children, theirs, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: set[int] = set()
    new = set(roots)
    while new:
        found |= new
        new = {pid for pid, parent in parents.items() if parent in new and pid not in found}
    return found - roots


def node_processes(node: object) -> set[int]:
    """Every process of a node: those Ray started for it and the task workers under them."""
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos}  # type: ignore[attr-defined]
    return roots | descendants(roots)


def shard_tasks(node: object) -> int:
    """How many of the node's processes run a shard task now (an idle worker is titled `ray::IDLE`)."""
    running = 0
    for pid in node_processes(node):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                running += fh.read().startswith(b"ray::run_shard")
        except OSError:
            continue
    return running


def main() -> None:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans below come to this process
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
            "_system_config": FAST_DEATH,
        },
    )
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    print(f"address {cluster.address}", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "remove-worker":
                cluster.remove_node(worker, allow_graceful=False)
                print("removed", flush=True)
            elif command == "worker-tasks":
                print(shard_tasks(worker), flush=True)
            elif command == "add-worker":
                worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
                cluster.wait_for_nodes()
                print("added", flush=True)
            elif command == "quit":
                break
    finally:
        cluster.shutdown()
        end_descendants()


if __name__ == "__main__":
    main()
