"""Run directory, stage completion markers and Ray connection.

A run directory is a local path or any pyarrow filesystem URI (``s3://bucket/run``). Each stage
writes its tables under ``<run_dir>/<table>/`` and, when finished, a marker
``<run_dir>/_stages/<stage>.json`` with its summary; a stage whose marker exists is complete.

Object storage: the endpoint, region and credentials come from the standard AWS environment
variables and config files (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``...), which pyarrow's ``S3FileSystem`` reads; :func:`init_ray` forwards the
``AWS_*`` variables set on the driver to every Ray worker. Every file is written so that no
partial file is ever visible under its final name: on a local disk through a uniquely named
temporary file and a rename; on object storage the object is uploaded in one request (or a
multipart upload completed on close), which is atomic, so it goes straight to its final key
(a rename there is a copy and a delete).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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

    @property
    def local(self) -> bool:
        """True for a directory on this host's filesystem (local disk or a mounted volume)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

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

    # writes: never a partial file under its final name ------------------------------
    def write_bytes_at(self, path: str, data: bytes) -> None:
        """Write ``data`` to the filesystem path ``path`` (see the module doc: atomic)."""
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(tmp) as fh:
                fh.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as fh:
                fh.write(data)

    def write_parquet_at(self, path: str, table: pa.Table) -> None:
        """Write ``table`` as one Parquet file at the filesystem path ``path``, atomically.

        The file is encoded in memory first: the upload starts only once the whole file exists.
        """
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes_at(path, sink.getvalue().to_pybytes())

    # small files -------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent:
            self.makedirs(parent)
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self.write_bytes_at(self.path(rel), data)

    def read_json(self, rel: str) -> Any:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return json.loads(fh.read().decode())

    # tables ------------------------------------------------------------------
    def write_table(self, table_dir: str, table: pa.Table, name: str = "part-00000") -> str:
        """Write one Parquet file atomically under ``table_dir``."""
        self.makedirs(table_dir)
        final = self.path(table_dir, f"{name}.parquet")
        self.write_parquet_at(final, table)
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

    # stage completion records -------------------------------------------------------
    # ``_stages/<stage>.json`` is written by the pipeline (:mod:`mllm_msr.pipeline`) when a stage
    # finishes: ``{"fingerprint", "config", "inputs", "parts", "summary", ...}``. A record
    # without a ``fingerprint`` comes from an older version (its summary at the top level).

    def stage_done(self, stage: str) -> bool:
        return self.exists("_stages", f"{stage}.json")

    def stage_record(self, stage: str) -> dict | None:
        return self.read_json(f"_stages/{stage}.json") if self.stage_done(stage) else None

    def write_stage_record(self, stage: str, record: dict) -> None:
        self.write_json(f"_stages/{stage}.json", {**record, "finished_at": time.time()})

    def stage_summary(self, stage: str) -> dict | None:
        record = self.stage_record(stage)
        if record is None:
            return None
        return record.get("summary", {}) if "fingerprint" in record else record

    def clear_stage(self, stage: str) -> None:
        self.remove("_stages", f"{stage}.json")

    # part manifests ------------------------------------------------------------------

    def files_under(self, rel: str) -> list[str]:
        """Relative paths of every file at or under ``rel`` (temporary files excluded)."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.File:
            return [rel]
        if info.type != pafs.FileType.Directory:
            return []
        sel = pafs.FileSelector(self.path(rel), recursive=True)
        root = self.root.rstrip("/") + "/"
        return sorted(
            i.path[len(root) :]
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and not i.path.endswith(".tmp")
            and ".tmp" not in i.base_name
        )

    def usage(self, rels: list[str]) -> tuple[int, int]:
        """Number of files and bytes at or under each of ``rels`` (one listing each)."""
        count = size = 0
        for rel in rels:
            info = self.fs.get_file_info(self.path(rel))
            if info.type == pafs.FileType.File:
                count, size = count + 1, size + (info.size or 0)
            elif info.type == pafs.FileType.Directory:
                sel = pafs.FileSelector(self.path(rel), recursive=True)
                for i in self.fs.get_file_info(sel):
                    if i.type == pafs.FileType.File:
                        count, size = count + 1, size + (i.size or 0)
        return count, size

    def describe_file(self, rel: str) -> dict:
        """Size, SHA-256 and (Parquet) row count of one file: what a rerun verifies."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open_input_stream(self.path(rel)) as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
        out: dict = {"bytes": size, "sha256": digest.hexdigest()}
        if rel.endswith(".parquet"):
            out["rows"] = pq.read_metadata(self.path(rel), filesystem=self.fs).num_rows
        return out

    def manifest(self, rels: list[str]) -> dict[str, dict]:
        """``{file: describe_file(file)}`` for every file under each of ``rels``."""
        return {f: self.describe_file(f) for rel in rels for f in self.files_under(rel)}

    def verify_manifest(self, manifest: dict[str, dict]) -> list[tuple[str, str]]:
        """The recorded files that are missing or differ: ``[(file, why)]``."""
        bad = []
        for rel, want in sorted(manifest.items()):
            if not self.exists(rel):
                bad.append((rel, "missing"))
                continue
            try:
                have = self.describe_file(rel)
            except Exception as exc:  # unreadable Parquet footer, I/O error
                bad.append((rel, f"unreadable: {exc}"))
                continue
            if have != want:
                diff = [k for k in want if have.get(k) != want[k]]
                bad.append(
                    (rel, "changed " + ", ".join(f"{k} {want[k]} -> {have.get(k)}" for k in diff))
                )
        return bad

    def drop_unreadable(self, table_dir: str, log=print) -> list[str]:
        """Delete Parquet files under ``table_dir`` whose footer cannot be read (a part cut
        short by a crash or a full disk); returns them. Incremental stages then redo their rows."""
        dropped = []
        for path in self.table_files(table_dir):
            try:
                pq.read_metadata(path, filesystem=self.fs)
            except Exception as exc:
                log(f"[{table_dir}] removing unreadable part {path}: {exc}")
                self.fs.delete_file(path)
                dropped.append(path)
        return dropped


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding what the folder ``uri`` (a path or a pyarrow URI) holds.

    A local path is yielded as is; a remote folder (``s3://...``) is downloaded into a temporary
    folder that is removed on exit: for libraries that read local files only (peft, transformers).
    """
    if "://" not in uri:
        yield uri
        return
    fs, path = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mmsr-copy-") as tmp:
        pafs.copy_files(
            path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield tmp


class RunDirNotShared(RuntimeError):
    """A run directory on one node's disk used by a Ray cluster of several nodes."""


def check_run_dir_shared(run: RunDir, shared: bool, nodes: int | None = None) -> None:
    """Refuse a local-path run directory when the Ray cluster has more than one node.

    Every node writes parts, checkpoints and records into the run directory: a path on the
    driver's disk is not there on the other nodes. ``shared`` (``PipelineConfig.run_dir_shared``)
    says the path is a mount every node sees (NFS, EFS...). ``nodes``: the number of alive Ray
    nodes (default: asked from the connected Ray).
    """
    if not run.local or shared:
        return
    if nodes is None:
        import ray

        if not ray.is_initialized():
            return  # no cluster connected: nothing to compare with
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise RunDirNotShared(
            f"run_dir {run.uri} is a local path, but the Ray cluster has {nodes} nodes: workers "
            f"on the other nodes would write to their own disks. Use object storage "
            f"(run_dir=s3://bucket/run) or, if the path is a mount that every node shares, set "
            f"run_dir_shared=true"
        )


def cpu_only_env() -> dict[str, str]:
    """vLLM settings measured on CPU-only hosts (DESIGN.md section 3). They are wrong on a GPU
    node, so they are never pushed to a whole cluster: the vLLM engine applies them in its own
    process when that process sees no GPU (:func:`mllm_msr.engines.vllm.configure_environment`)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


def process_env(cache_dir: str | os.PathLike, gpu: bool) -> dict[str, str]:
    """Defaults of one engine or train process on a node: the caches under ``cache_dir`` (tiny
    models, DeepSpeed's compiled ops, vLLM's cache and config roots), vLLM telemetry off, and
    only where the node has no GPU (``gpu`` false) the CPU-only settings (:func:`cpu_only_env`).
    The hub mode is not here: it is the config's ``hf_hub_offline`` (:func:`worker_env`)."""
    cache = Path(cache_dir).absolute()
    env = {
        "MLLM_MSR_CACHE": str(cache),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_CONFIG_ROOT": str(cache / "vllm" / "config"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    }
    if not gpu:
        env.update(cpu_only_env())
    return env


_T = TypeVar("_T")


class EngineThread:
    """One dedicated thread that runs every call of an engine, its construction included.

    OpenMP keeps a team of worker threads per calling thread. An engine built on one thread and
    called from another gets a second team: Ray Data runs a callable class's constructor on the
    actor's main thread and every call on a thread of its own. libgomp then manages more threads than
    there are cores, shortens its spin-wait to almost nothing, and its workers sleep and wake
    around every parallel region: 29-41 thousand voluntary context switches per 12 s pass
    against none, 5-13% slower (SmolLM2, 2 threads on 2 cores; ``bench/results/
    user_preferences/NOTES.md``). Once, in a Ray actor whose two threads had different thread
    counts, vLLM's CPU attention also failed its check ``thread_num == thread_num (1 vs. 2)``
    (not reproduced outside Ray). Calls made on the engine thread itself run directly.
    """

    def __init__(self, name: str = "engine") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the engine thread; its result, or its exception raised."""
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Let the thread end once its queued calls are done (later calls raise)."""
        self._pool.shutdown(wait=False)


@dataclass
class WallSpan:
    """Wall-clock span of batches run by concurrent actors: from the first batch's start to the
    last one's end (the engine phase of a stage, engine start-up excluded; 0 before any)."""

    first_start: float = math.inf
    last_end: float = -math.inf

    def add(self, started_at: float, finished_at: float) -> None:
        self.first_start = min(self.first_start, started_at)
        self.last_end = max(self.last_end, finished_at)

    @property
    def seconds(self) -> float:
        return max(0.0, self.last_end - self.first_start)


def has_gpu() -> bool:
    """Whether this process sees a CUDA device (torch not importable: no)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def apply_process_env(
    cache_dir: str | os.PathLike,
    gpu: bool | None = None,
    prefix: str = "",
    forced: dict[str, str] | None = None,
) -> dict[str, str]:
    """Set this process's environment from :func:`process_env` (``gpu``: detected when None);
    the one place engine and train processes get their settings. Only the variables whose name
    starts with ``prefix``; variables the user already set are kept, except ``forced`` ones.
    Returns what it set. Call before the engine or model is created."""
    env = process_env(cache_dir, has_gpu() if gpu is None else gpu)
    applied = {}
    for key, value in env.items():
        if key.startswith(prefix) and key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    for key, value in (forced or {}).items():
        os.environ[key] = value
        applied[key] = value
    return applied


@contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` for the duration of the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def node_cache_dir(configured: str | os.PathLike) -> str:
    """The model cache of this run: ``$MLLM_MSR_CACHE`` when set (the CLI exports the config's,
    :func:`use_cache_dir`, and the driver forwards it to every worker), else the configured path,
    absolute. Models synced from object storage go to ``$MLLM_MSR_NODE_CACHE`` instead where a
    node sets it (:func:`mllm_msr.model_source.node_cache`)."""
    return os.environ.get("MLLM_MSR_CACHE") or str(Path(configured).absolute())


def hub_env(offline: bool = True) -> dict[str, str]:
    """The Hugging Face hub mode: ``PipelineConfig.hf_hub_offline`` (offline for the demo and
    tests: nothing is downloaded at run time)."""
    value = "1" if offline else "0"
    return {"HF_HUB_OFFLINE": value, "TRANSFORMERS_OFFLINE": value}


def cpu_env_defaults() -> dict[str, str]:
    """Everything measured to make vLLM + Ray behave on one CPU-only host (tests, benches).

    For a single host without a GPU only; :func:`init_ray` pushes no CPU-only setting.
    """
    return {
        **cpu_only_env(),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        **hub_env(True),
        "TOKENIZERS_PARALLELISM": "false",
    }


def worker_env(hf_hub_offline: bool = True) -> dict[str, str]:
    """The environment :func:`init_ray` gives every Ray worker, whatever its node.

    The hub mode (:func:`hub_env`; set in the caller's environment, it wins), quiet tokenizers,
    the caches and the ``AWS_*`` variables set here (:func:`aws_env`). Nothing CPU-specific:
    CPU-only settings are applied per process where there is no GPU (:func:`cpu_only_env`); the
    Ray Train health-check interval is set on the driver, which Ray Train passes to its
    controller (:func:`mllm_msr.stages.train.run_train`).
    """
    defaults = {**hub_env(hf_hub_offline), "TOKENIZERS_PARALLELISM": "false"}
    env = {k: os.environ.get(k, v) for k, v in defaults.items()}
    for k in ("MLLM_MSR_CACHE", "VLLM_CACHE_ROOT", "TORCH_EXTENSIONS_DIR"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(aws_env())
    return env


def aws_env() -> dict[str, str]:
    """The standard ``AWS_*`` variables set here (endpoint, region, credentials, profile).

    Forwarded to Ray workers so that they reach the same object store as the driver. Clusters
    that give their nodes an IAM role set none of them: nothing is forwarded then.
    """
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def use_cache_dir(cache_dir: str) -> str:
    """Export the model cache dir (absolute) so that Ray workers build/find tiny models there.

    ``MLLM_MSR_CACHE`` already set in the environment wins over the config.
    """
    path = node_cache_dir(cache_dir)
    os.environ["MLLM_MSR_CACHE"] = path
    apply_process_env(path, gpu=False, prefix="TORCH_EXTENSIONS_DIR")
    return path


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = 1_000_000_000,
    runtime_env: dict | None = None,
    hf_hub_offline: bool = True,
) -> Any:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray.

    Every worker gets :func:`worker_env` (the hub mode ``hf_hub_offline``, the caches, the
    ``AWS_*`` variables set here); nothing CPU-specific is pushed to GPU nodes.
    """
    import ray

    from mllm_msr import console

    if ray.is_initialized():
        return ray
    console.configure()  # our level and the engines' (--log-level), here and in the workers
    env_vars = worker_env(hf_hub_offline)
    env_vars.update({k: os.environ.get(k, v) for k, v in console.worker_env().items()})
    renv: dict[str, Any] = {
        "env_vars": env_vars,
        # every worker and actor sets our log levels and drops known noise before user code
        "worker_process_setup_hook": "mllm_msr.console.setup_worker",
    }
    if runtime_env:
        renv = {**renv, **runtime_env, "env_vars": {**env_vars, **runtime_env.get("env_vars", {})}}
    address = address or os.environ.get("RAY_ADDRESS")
    engine_level = console.engine_level()  # the "ray" logger of this driver
    if address:
        ray.init(address=address, runtime_env=renv, log_to_driver=True, logging_level=engine_level)
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
            logging_level=engine_level,
        )
    console.configure_ray_data()
    return ray
