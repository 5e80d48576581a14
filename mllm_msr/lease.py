"""A run-directory lease: one pipeline at a time per run directory.

``<run_dir>/_lease.json`` names its holder (host, pid, start time) and a heartbeat the holder
refreshes every ``heartbeat_s`` seconds. A second pipeline on the same run directory refuses to
start and names the holder. A lease whose holder is gone is taken over: at once when the holder
ran on this host and its process no longer exists, after ``ttl_s`` seconds without a heartbeat
otherwise (another host, where the pid cannot be checked).

On a local disk the lease file is created with ``O_EXCL`` (two racing starters cannot both win).
Object stores have no create-if-absent in pyarrow: the starter writes its lease, waits
``settle_s`` and reads it back (S3 reads are strongly consistent), so of two starters racing
within that window the later writer wins and the earlier one refuses. The heartbeat also reads
the lease back; a holder that finds another holder's token stops with :class:`LeaseLost`
between stages.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from mllm_msr.runtime import RunDir

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live pipeline holds the run directory."""


class LeaseLost(RuntimeError):
    """This pipeline's lease was taken over while it ran."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLease:
    def __init__(
        self,
        run: RunDir,
        ttl_s: float = 120.0,
        heartbeat_s: float = 15.0,
        settle_s: float = 1.0,
        log=print,
    ) -> None:
        self.run = run
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self.log = log
        self.token = uuid.uuid4().hex
        self.info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "token": self.token,
        }
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state of the lease
    def read(self) -> dict | None:
        if not self.run.exists(LEASE_FILE):
            return None
        try:
            return self.run.read_json(LEASE_FILE)
        except Exception:  # a lease cut short while written: treat as absent
            return None

    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder``'s lease may be taken over, or None while it is live."""
        if holder.get("host") == socket.gethostname() and not _pid_alive(
            int(holder.get("pid", -1))
        ):
            return f"its process {holder.get('pid')} on this host is gone"
        age = time.time() - float(holder.get("heartbeat_at", holder.get("started_at", 0)))
        if age > self.ttl_s:
            return f"no heartbeat for {age:.0f} s (ttl {self.ttl_s:.0f} s)"
        return None

    @staticmethod
    def describe(holder: dict) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"

    # ------------------------------------------------------------------ acquire / release
    def _payload(self) -> bytes:
        return json.dumps({**self.info, "heartbeat_at": time.time()}, indent=2).encode()

    def _create_local(self) -> bool:
        path = self.run.path(LEASE_FILE)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._payload())
        return True

    def _write(self) -> None:
        self.run.write_bytes_at(self.run.path(LEASE_FILE), self._payload())

    def acquire(self) -> RunLease:
        local = self.run.local
        for _ in range(3):
            holder = self.read()
            if holder is not None and holder.get("token") != self.token:
                why = self.stale_reason(holder)
                if why is None:
                    raise LeaseHeld(
                        f"run directory {self.run.uri} is in use by {self.describe(holder)} "
                        f"(lease {self.run.uri_of(LEASE_FILE)}, last heartbeat "
                        f"{time.time() - holder.get('heartbeat_at', 0):.0f} s ago); wait for "
                        f"it to finish, or use another run_dir"
                    )
                self.log(f"[lease] taking over the lease of {self.describe(holder)}: {why}")
                self.run.remove(LEASE_FILE)
            if local:
                if not self._create_local():
                    continue  # another starter created it between our read and create
            else:
                self._write()
                time.sleep(self.settle_s)
                holder = self.read()
                if holder is None or holder.get("token") != self.token:
                    continue
            self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
            self._thread.start()
            return self
        holder = self.read() or {}
        raise LeaseHeld(f"run directory {self.run.uri} was taken by {self.describe(holder)}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read()
                if holder is None or holder.get("token") != self.token:
                    self.lost = True
                    self.log(
                        f"[lease] lost the run directory lease to "
                        f"{self.describe(holder or {})}; stopping after this stage"
                    )
                    return
                self._write()
            except Exception as exc:  # a transient storage error: retry at the next beat
                self.log(f"[lease] heartbeat failed: {exc}")

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"the lease on {self.run.uri} was taken over by another pipeline")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            self.run.remove(LEASE_FILE)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
