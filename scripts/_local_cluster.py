"""Helpers of ``scripts/local_cluster.sh`` that are easier in Python than in bash.

    python scripts/_local_cluster.py free-ports N
    python scripts/_local_cluster.py wait-ready URL TOKEN_FILE TIMEOUT_S
    python scripts/_local_cluster.py stop ROOT_PID CLUSTER_ID [GRACE_S]
    python scripts/_local_cluster.py autoscaling-config SRC DST GCS_ADDRESS

``stop`` stops one local cluster and nothing else. ``ray stop`` would kill every Ray process
of the host, other people's clusters included. A cluster started by ``local_cluster.sh`` is the
process tree of one ``ray start --head --block`` process (``ROOT_PID``) whose environment
carries ``MLLM_MSR_RAY_CLUSTER_ID=CLUSTER_ID``; every Ray process it starts inherits that
variable, job drivers too (they run in sessions of their own, so a process-group kill would
miss them). ``stop`` sends SIGTERM to the root, which makes Ray drain and stop its own
processes, then SIGTERM and finally SIGKILL to whatever of the tree or of the marked processes
is still alive. Only processes of the calling user are considered.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request

import psutil

MARKER_VAR = "MLLM_MSR_RAY_CLUSTER_ID"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on this host right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_ready(url: str, token_file: str, timeout_s: float) -> bool:
    """Poll the job API (``GET /api/jobs/``) with the cluster's token until it answers 200."""
    with open(token_file) as fh:
        token = fh.read().strip()
    request = urllib.request.Request(
        url.rstrip("/") + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def _own_ancestors() -> set[int]:
    pids, proc = set(), psutil.Process()
    while proc is not None:
        pids.add(proc.pid)
        proc = proc.parent()
    return pids


def _marked(proc: psutil.Process, cluster_id: str, uid: int) -> bool:
    """A process of user ``uid`` whose environment carries ``cluster_id``."""
    try:
        return proc.uids().real == uid and proc.environ().get(MARKER_VAR) == cluster_id
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def cluster_processes(root_pid: int, cluster_id: str) -> list[psutil.Process]:
    """The root and its descendants, and every process of this user marked with ``cluster_id``.

    The root's tree counts only while the root itself carries the marker: a recorded PID that
    now belongs to another process (the cluster died and the PID was reused) is left alone.
    """
    found: dict[int, psutil.Process] = {}
    uid = os.getuid()
    try:
        root = psutil.Process(root_pid)
        if _marked(root, cluster_id, uid):
            found[root.pid] = root
            found.update((p.pid, p) for p in root.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        if _marked(proc, cluster_id, uid):
            found[proc.pid] = proc
    for pid in _own_ancestors():
        found.pop(pid, None)
    return [p for p in found.values() if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is dead; only its parent can reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_all(procs: list[psutil.Process], kill: bool) -> None:
    for proc in procs:
        try:
            proc.kill() if kill else proc.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def stop(root_pid: int, cluster_id: str, grace_s: float = 30.0) -> int:
    """Stop one cluster; return the number of processes that had to be killed."""
    procs = cluster_processes(root_pid, cluster_id)
    if not procs:
        print("no process of this cluster is running")
        return 0
    roots = [p for p in procs if p.pid == root_pid]
    _signal_all(roots, kill=False)  # Ray drains and stops its own processes
    psutil.wait_procs(roots, timeout=grace_s)
    alive = [p for p in procs if _alive(p)]
    _signal_all(alive, kill=False)
    _, alive = psutil.wait_procs(alive, timeout=5)
    _signal_all(alive, kill=True)
    psutil.wait_procs(alive, timeout=5)
    # Processes started while we were stopping (late workers) carry the marker too.
    late = cluster_processes(root_pid, cluster_id)
    _signal_all(late, kill=True)
    psutil.wait_procs(late, timeout=5)
    print(f"stopped {len(procs)} processes ({len(alive) + len(late)} needed SIGKILL)")
    return len(alive) + len(late)


def autoscaling_config(src: str, dst: str, gcs_address: str) -> None:
    """Copy the autoscaling config ``src`` to ``dst`` (JSON, which is YAML) with the head's
    ``gcs_address`` filled in. Only Ray's fake multi-node provider makes sense for a cluster
    on this machine: any other provider type is refused."""
    import json

    import yaml

    with open(src) as fh:
        config = yaml.safe_load(fh)
    kind = (config.get("provider") or {}).get("type") if isinstance(config, dict) else None
    if kind != "fake_multinode":
        raise SystemExit(
            f"MLLM_MSR_RAY_AUTOSCALING_CONFIG={src}: provider type {kind!r}; a local cluster "
            "autoscales only with Ray's fake multi-node provider (provider: type: "
            "fake_multinode, e.g. cluster/fake-autoscaling.yaml); cloud configs go to `ray up`"
        )
    config["provider"]["gcs_address"] = gcs_address
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=1)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "free-ports":
        print(" ".join(map(str, free_ports(int(argv[1])))))
        return 0
    if len(argv) == 4 and argv[0] == "wait-ready":
        return 0 if wait_ready(argv[1], argv[2], float(argv[3])) else 1
    if len(argv) in (3, 4) and argv[0] == "stop":
        stop(int(argv[1]), argv[2], float(argv[3]) if len(argv) == 4 else 30.0)
        left = cluster_processes(int(argv[1]), argv[2])
        return 1 if left else 0
    if len(argv) == 4 and argv[0] == "autoscaling-config":
        autoscaling_config(argv[1], argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
