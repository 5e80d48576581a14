"""Benchmark records: what a benchmark writes under ``bench/results/<bench>/``.

Each record is one JSON file written by the benchmark itself (never edited by hand; notes go in
a separate ``.md`` file beside it). It carries the git commit, CPU model, core count, the load
average before and after the run and the package versions, so that a figure can be traced to
the code and the machine that produced it.

Ratios between two paths of a benchmark mean something only when nothing else competes for the
cores: :func:`gate_ratios` refuses them (``ratios`` becomes ``None`` and ``ratios_refused``
says why) when the 1-minute load average before the run exceeds the core count. The load after
the run is recorded (and noted when above the core count) but does not gate: it includes the
benchmark's own processes (two engine actors and Ray Data's driver load two cores fully). With
``allow_load=True`` (the benches' ``--allow-load``, for diagnosis) they are kept and the record
is marked ``quiet: false``.

Example::

    rec = BenchRecord.start("item_summaries")
    ...  # run the benchmark
    report["ratios"] = rec.gate_ratios(ratios, allow_load=args.allow_load)
    path = rec.write(report, tag="smollm2")
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_msr import provenance

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
"""Default folder of benchmark records (one sub-folder per benchmark)."""


def add_arguments(parser: Any) -> None:
    """The options every recording benchmark takes: ``--out``, ``--no-record``, ``--allow-load``."""
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--no-record", action="store_true", help="no record in bench/results/")
    parser.add_argument(
        "--allow-load",
        action="store_true",
        help="report ratios even when the load average exceeds the cores (marked not quiet)",
    )


def load_average() -> float:
    """The 1-minute load average of this host."""
    return round(os.getloadavg()[0], 2)


def cores() -> int:
    """Cores this process may run on (the affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class BenchRecord:
    """Provenance of one benchmark run; :meth:`start` before the work, :meth:`write` after."""

    bench: str
    load_before: float
    started_at: float
    cores: int
    load_after: float | None = None
    quiet: bool | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, bench: str) -> BenchRecord:
        return cls(bench, load_average(), time.time(), cores())

    def finish(self) -> None:
        if self.load_after is None:
            self.load_after = load_average()

    def busy(self) -> str | None:
        """Why the machine was not quiet (load above the core count), or None."""
        self.finish()
        if (self.load_after or 0.0) > self.cores:
            note = (
                f"load average after the run {self.load_after:.2f} exceeds the {self.cores} "
                "cores (the benchmark's own processes count in it)"
            )
            if note not in self.notes:
                self.notes.append(note)
        if self.load_before > self.cores:
            return (
                f"load average {self.load_before:.2f} before the run (after "
                f"{self.load_after:.2f}) exceeds the {self.cores} cores: other processes "
                f"competed for the CPUs, so ratios between the paths are not reported; rerun "
                f"on a quiet machine (or pass --allow-load to report them anyway, marked not "
                f"quiet)"
            )
        return None

    def gate_ratios(self, ratios: dict[str, Any], allow_load: bool = False) -> dict | None:
        """``ratios`` on a quiet machine (or with ``allow_load``), else None (see module doc)."""
        why = self.busy()
        self.quiet = why is None
        if why is None:
            return ratios
        self.notes.append(why)
        return ratios if allow_load else None

    def provenance(self) -> dict[str, Any]:
        self.finish()
        hw = provenance.hardware()
        git = provenance.git_info(Path(__file__).resolve().parent)
        return {
            "bench": self.bench,
            "git_commit": git["commit"] if git else None,
            "git_dirty": git["dirty"] if git else None,
            "cpu_model": hw["cpu_model"],
            "cores": self.cores,
            "cpu_count": hw["cpu_count"],
            "ram_bytes": hw["ram_bytes"],
            "platform": hw["platform"],
            "python": hw["python"],
            "load_before": self.load_before,
            "load_after": self.load_after,
            "quiet": self.quiet,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started_at)),
            "seconds": round(time.time() - self.started_at, 1),
            "packages": provenance.package_versions(),
        }

    def write(
        self, report: dict[str, Any], tag: str = "", results_dir: str | os.PathLike | None = None
    ) -> Path:
        """Write ``{"provenance": ..., **report}`` to ``<results_dir>/<bench>/<time>[-tag].json``."""
        report = dict(report)
        if "ratios" in report and report["ratios"] is None:
            report["ratios_refused"] = self.notes[-1] if self.notes else "machine not quiet"
        record = {"provenance": self.provenance(), **report}
        if self.notes:
            record["notes"] = self.notes
        folder = Path(results_dir or RESULTS_DIR) / self.bench
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        path = folder / f"{stamp}{'-' + tag if tag else ''}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(path)
        return path
