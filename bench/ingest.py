"""Ingest throughput and memory on the demo generator: is the stage streaming?

Runs the ingest stage (format ``demo``) for each user count in a fresh process with its own
embedded Ray, samples the resident memory of the driver and of every Ray process it started
(workers, raylet, object store) every 0.2 s, and reports rows/s and peak memory. Memory that
stays flat while the rows grow 4x shows the data is streamed through the cluster, not
collected on the driver.

    .venv/bin/python bench/ingest.py                      # 25k and 100k users
    .venv/bin/python bench/ingest.py --users 10000 --items 1000 --out bench/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class MemorySampler(threading.Thread):
    """Peak RSS of this process and of all its descendants (the Ray processes it started)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.peak_driver = self.peak_workers = self.peak_worker = self.peak_total = 0

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            driver = self.me.memory_info().rss
            workers = []
            other = 0
            for child in self.me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    name = " ".join(child.cmdline()[:1])
                except psutil.Error:
                    continue
                if name.startswith("ray::"):
                    workers.append(rss)
                else:
                    other += rss
            self.peak_driver = max(self.peak_driver, driver)
            self.peak_workers = max(self.peak_workers, sum(workers))
            self.peak_worker = max(self.peak_worker, max(workers, default=0))
            self.peak_total = max(self.peak_total, driver + sum(workers) + other)
            self.stop.wait(self.interval_s)


def run_one(users: int, items: int, shards: int) -> dict:
    """One ingest in this process (called in a fresh subprocess by :func:`main`)."""
    from mllm_msr.config import config_from_dict
    from mllm_msr.runtime import RunDir, init_ray
    from mllm_msr.stages.ingest import run_ingest

    with tempfile.TemporaryDirectory(prefix="mmsr-bench-") as tmp:
        cfg = config_from_dict(
            {
                "run_dir": f"{tmp}/run",
                "ray": {"num_cpus": 2, "object_store_memory": 500_000_000},
                "ingest": {
                    "format": "demo",
                    "demo_users": users,
                    "demo_items": items,
                    "num_shards": shards,
                },
            }
        )
        init_ray(
            cfg.ray.address,
            cfg.ray.num_cpus,
            cfg.ray.object_store_memory,
            hf_hub_offline=cfg.hf_hub_offline,
        )
        sampler = MemorySampler()
        sampler.start()
        t0 = time.perf_counter()
        summary = run_ingest(cfg, RunDir(cfg.run_dir), log=lambda *_: None)
        seconds = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    rows = summary["interactions"]["written"] + summary["items"]["written"]
    mib = 1024 * 1024
    return {
        "users": users,
        "items": items,
        "interactions": summary["interactions"]["written"],
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "interactions_per_s": round(summary["interactions"]["written"] / seconds),
        "peak_driver_rss_mib": round(sampler.peak_driver / mib),
        "peak_ray_workers_rss_mib": round(sampler.peak_workers / mib),
        "peak_single_worker_rss_mib": round(sampler.peak_worker / mib),
        "peak_all_processes_rss_mib": round(sampler.peak_total / mib),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[25_000, 100_000])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.items, args.shards)))
        return
    results = []
    for users in args.users:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(users),
            "--items",
            str(args.items),
            "--shards",
            str(args.shards),
        ]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res), flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"rows x{b['interactions'] / a['interactions']:.1f}: driver peak "
            f"{a['peak_driver_rss_mib']} -> {b['peak_driver_rss_mib']} MiB, Ray workers peak "
            f"{a['peak_ray_workers_rss_mib']} -> {b['peak_ray_workers_rss_mib']} MiB"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
