"""Run directory, stage completion markers and Ray connection.

A run directory is a local path or any pyarrow filesystem URI (``s3://bucket/run``). Each stage
writes its tables under ``<run_dir>/<table>/`` and, when finished, a marker
``<run_dir>/_stages/<stage>.json`` with its summary; a stage whose marker exists is complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


@dataclass
class RunDir:
    """A run directory on a pyarrow filesystem."""

    uri: str

    def __post_init__(self) -> None:
        if "://" in self.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.uri = str(Path(self.uri).absolute())
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
        self.fs.create_dir(self.root, recursive=True)

    # paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri_of(self, *parts: str) -> str:
        """A path Ray Data / pyarrow readers accept (URI for remote filesystems)."""
        if "://" in self.uri:
            return "/".join([self.uri.rstrip("/"), *parts])
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> str:
        p = self.path(*parts)
        self.fs.create_dir(p, recursive=True)
        return p

    def remove(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    # small files -------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent:
            self.makedirs(parent)
        tmp = self.path(rel + ".tmp")
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, self.path(rel))

    def read_json(self, rel: str) -> Any:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return json.loads(fh.read().decode())

    # tables ------------------------------------------------------------------
    def write_table(self, table_dir: str, table: pa.Table, name: str = "part-00000") -> str:
        """Write one Parquet file atomically (tmp + rename) under ``table_dir``."""
        self.makedirs(table_dir)
        final = self.path(table_dir, f"{name}.parquet")
        tmp = final + ".tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        return final

    def table_files(self, table_dir: str) -> list[str]:
        if not self.exists(table_dir):
            return []
        sel = pafs.FileSelector(self.path(table_dir), recursive=True)
        return sorted(i.path for i in self.fs.get_file_info(sel) if i.path.endswith(".parquet"))

    def read_table(self, table_dir: str, columns: list[str] | None = None) -> pa.Table:
        files = self.table_files(table_dir)
        if not files:
            raise FileNotFoundError(f"no Parquet files under {self.path(table_dir)}")
        return pa.concat_tables(
            [pq.read_table(f, columns=columns, filesystem=self.fs) for f in files],
            promote_options="default",
        )

    # stage markers -------------------------------------------------------------
    def stage_done(self, stage: str) -> bool:
        return self.exists("_stages", f"{stage}.json")

    def mark_done(self, stage: str, summary: dict) -> None:
        self.write_json(f"_stages/{stage}.json", {**summary, "finished_at": time.time()})

    def stage_summary(self, stage: str) -> dict | None:
        return self.read_json(f"_stages/{stage}.json") if self.stage_done(stage) else None

    def clear_stage(self, stage: str) -> None:
        self.remove("_stages", f"{stage}.json")


def cpu_env_defaults() -> dict[str, str]:
    """Environment settings measured to make vLLM + Ray behave on CPU-only hosts."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def use_cache_dir(cache_dir: str) -> str:
    """Export the model cache dir (absolute) so that Ray workers build/find tiny models there.

    ``MLLM_MSR_CACHE`` already set in the environment wins over the config.
    """
    path = os.environ.get("MLLM_MSR_CACHE") or str(Path(cache_dir).absolute())
    os.environ["MLLM_MSR_CACHE"] = path
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(path) / "torch_extensions"))
    return path


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing
        return False


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = 1_000_000_000,
    runtime_env: dict | None = None,
) -> Any:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray.

    The worker environment gets the CPU defaults (offline hub, vLLM CPU settings) unless the
    caller's environment already sets them.
    """
    import ray

    if ray.is_initialized():
        return ray
    env_vars = {k: os.environ.get(k, v) for k, v in cpu_env_defaults().items()}
    for k in ("MLLM_MSR_CACHE", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR"):
        if k in os.environ:
            env_vars[k] = os.environ[k]
    renv = {"env_vars": env_vars}
    if runtime_env:
        renv = {**runtime_env, "env_vars": {**env_vars, **runtime_env.get("env_vars", {})}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=renv, log_to_driver=True)
    else:
        for k, v in env_vars.items():
            os.environ.setdefault(k, v)
        # address="local": always a new embedded instance, never a cluster that happens to be
        # running on this host (a bare ray.init() would join it).
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            runtime_env=renv,
            include_dashboard=False,
            log_to_driver=True,
        )
    return ray
