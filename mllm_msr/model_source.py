"""Model weights on every node: a model folder on object storage synced into a node-local cache.

A node that starts with an empty disk (an autoscaled GPU worker) gets the models from object
storage: a model setting (``engine.model``, ``train.model``, ...) may name a model folder under
any pyarrow URI (``s3://bucket/models/Qwen2.5-VL-7B-Instruct``). Each actor or train worker
resolves it (:func:`mllm_msr.tiny.resolve_model` -> :func:`sync_model`) on first use: the first
process of a node downloads it into ``<cache_dir>/model_source/<name>-<hash>``, holding a
node-local ``fcntl`` lock, so a node downloads it once and the others wait and reuse it. Every
file is checked against the sha256 of the manifest (``MANIFEST.json``) that :func:`publish_models`
writes last when the model is published; a file that does not match fails with
:class:`ModelChecksumError`. The endpoint and credentials come from the standard AWS variables.

Publish once (from a machine that has the model folder)::

    python -m mllm_msr.model_source /path/to/Qwen2.5-VL-7B-Instruct s3://bucket/models/Qwen2.5-VL-7B-Instruct

On one node a process finds the synced copy under ``$MLLM_MSR_NODE_CACHE`` when the node sets it
(its image, or the environment of its ``ray start``): a node-local variable that the driver never
forwards, unlike ``MLLM_MSR_CACHE`` (the run's cache, which every worker gets from the driver).
Each download appends one line to ``<name>-<hash>.downloads.jsonl`` beside the folder (host, pid,
files, bytes, seconds), so an operator can see when and how often a node fetched a model.

The two other ways need nothing here: weights baked into the node image, or a shared volume
(EFS, NFS, a PVC) mounted on every node, each named by its local path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
_DONE = ".synced.json"
_CHUNK = 8 << 20
NODE_CACHE_ENV = "MLLM_MSR_NODE_CACHE"
"""A node's own model cache (set on the node, never forwarded): wins over the run's cache."""


class ModelChecksumError(RuntimeError):
    """A synced model file does not match the sha256 of the published manifest."""


def is_source(spec: str) -> bool:
    """True for a model folder under a pyarrow URI (``s3://...``); False for paths, hub ids."""
    return "://" in spec and not spec.startswith("file://")


def _sha256_stream(fh) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def publish_models(local_dir: str | os.PathLike, dest_uri: str) -> dict:
    """Upload the model folder ``local_dir`` to ``dest_uri`` with its sha256 manifest; return it.

    The manifest is written last: a folder without one is an unfinished upload.
    """
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"publish_models: no model folder {str(src)!r}")
    fs, root = pafs.FileSystem.from_uri(dest_uri) if "://" in dest_uri else (None, dest_uri)
    if fs is None:
        fs, root = pafs.LocalFileSystem(), str(Path(dest_uri).absolute())
    root = root.rstrip("/")
    fs.create_dir(root, recursive=True)
    entries = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if rel == MANIFEST:
            continue
        with open(path, "rb") as fh:
            digest, size = _sha256_stream(fh)
        with open(path, "rb") as fh, fs.open_output_stream(f"{root}/{rel}") as out:
            shutil.copyfileobj(fh, out, _CHUNK)
        entries[rel] = {"sha256": digest, "size": size}
    if not entries:
        raise FileNotFoundError(f"publish_models: {str(src)!r} holds no files")
    manifest = {"version": MANIFEST_VERSION, "files": entries}
    with fs.open_output_stream(f"{root}/{MANIFEST}") as out:
        out.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_manifest(uri: str) -> dict:
    """The manifest of the published model folder ``uri`` (a clear error when there is none)."""
    fs, root = pafs.FileSystem.from_uri(uri)
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{MANIFEST}") as fh:
            manifest = json.loads(fh.read())
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"model {uri!r}: no {MANIFEST} there ({exc}); publish the model folder first with "
            f"`python -m mllm_msr.model_source LOCAL_DIR {uri}`"
        ) from None
    if manifest.get("version") != MANIFEST_VERSION or not manifest.get("files"):
        raise ValueError(f"model {uri!r}: {MANIFEST} is not a version-{MANIFEST_VERSION} manifest")
    return manifest


def local_dir(uri: str, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`sync_model` puts ``uri`` under ``cache_dir``."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    tag = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    return Path(cache_dir) / "model_source" / f"{name}-{tag}"


def node_cache(cache_dir: str | os.PathLike) -> str:
    """Where this node keeps synced models: ``$MLLM_MSR_NODE_CACHE`` if the node sets it, else
    ``cache_dir`` (the run's cache)."""
    return os.environ.get(NODE_CACHE_ENV) or str(cache_dir)


def downloads(uri: str, cache_dir: str | os.PathLike) -> list[dict]:
    """The download records of ``uri`` in ``cache_dir``: one per download, oldest first."""
    return downloads_in(local_dir(uri, cache_dir))


def _synced(dest: Path, manifest: dict) -> bool:
    try:
        return json.loads((dest / _DONE).read_text()) == manifest
    except (OSError, ValueError):
        return False


def sync_model(uri: str, cache_dir: str | os.PathLike) -> str:
    """The local folder of the published model ``uri``, downloaded on this node's first use.

    One download per node and cache: a node-local ``fcntl`` lock serializes the processes of
    a node; a folder whose record matches the current manifest is reused as is. Each file is
    verified by sha256 while it is downloaded; the folder appears under its final name only
    when every file matched. Raises :class:`ModelChecksumError` on a mismatch.
    """
    manifest = read_manifest(uri)
    dest = local_dir(uri, cache_dir)
    if _synced(dest, manifest):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if _synced(dest, manifest):  # another process of this node did it while we waited
            return str(dest)
        fs, root = pafs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        t0, total = time.monotonic(), 0
        try:
            for rel, want in sorted(manifest["files"].items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                h, n = hashlib.sha256(), 0
                with fs.open_input_stream(f"{root}/{rel}") as fh, open(target, "wb") as out:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                        n += len(chunk)
                        out.write(chunk)
                total += n
                if h.hexdigest() != want["sha256"] or n != want["size"]:
                    raise ModelChecksumError(
                        f"model {uri!r}: {rel} has sha256 {h.hexdigest()} ({n} bytes), the "
                        f"manifest says {want['sha256']} ({want['size']} bytes): the object "
                        "changed or is corrupt; publish the model again (publish_models)"
                    )
            (tmp / _DONE).write_text(json.dumps(manifest, sort_keys=True))
            if dest.exists():  # an older or broken copy
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record = {
            "uri": uri.rstrip("/"),
            "at": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "files": len(manifest["files"]),
            "bytes": total,
            "seconds": round(time.monotonic() - t0, 3),
        }
        with open(dest.parent / f"{dest.name}.downloads.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
    return str(dest)


def _stale(uri: str | None, synced: Path) -> str | None:
    """Why the synced folder of ``uri`` is out of date (None: current, or source unknown)."""
    if uri is None:
        return None
    try:
        manifest = read_manifest(uri)
    except FileNotFoundError:
        return f"its source {uri} holds no {MANIFEST} any more"
    if not _synced(synced, manifest):
        return f"older than the manifest of its source {uri}"
    return None


def prune(
    cache_dir: str | os.PathLike,
    keep: list[str] | None = None,
    dry_run: bool = False,
    log=print,
) -> list[Path]:
    """Remove synced models from ``<cache_dir>/model_source`` that are out of date; return them.

    A synced folder goes when its source's manifest changed (republished) or is gone, and, when
    ``keep`` (model URIs) is given, when it is not one of them. A folder whose source is not
    known (synced before the download records named it) goes only under ``keep``. Unfinished
    downloads (``.<name>-*`` folders of a process killed mid-download) go when no process holds
    their lock. Each removal takes the folder's node-local lock, so it never races a sync; run
    it between runs (an engine that loaded the model keeps working, its files are unlinked).
    """
    root = Path(cache_dir) / "model_source"
    if not root.is_dir():
        return []
    wanted = {local_dir(uri, cache_dir).name for uri in keep} if keep is not None else None
    removed: list[Path] = []
    for synced in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        records = downloads_in(synced)
        uri = records[-1].get("uri") if records else None
        if wanted is not None and synced.name not in wanted:
            reason = "not in the models to keep"
        else:
            reason = _stale(uri, synced)
        if reason is None:
            continue
        log(f"[model_source] {'would remove' if dry_run else 'removing'} {synced}: {reason}")
        removed.append(synced)
        if dry_run:
            continue
        with open(root / f"{synced.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(synced, ignore_errors=True)
            (root / f"{synced.name}.downloads.jsonl").unlink(missing_ok=True)
    for partial in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")):
        name = partial.name[1:].rsplit("-", 1)[0]
        with open(root / f"{name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a download in progress
                continue
            log(f"[model_source] {'would remove' if dry_run else 'removing'} {partial}: unfinished")
            removed.append(partial)
            if not dry_run:
                shutil.rmtree(partial, ignore_errors=True)
    return removed


def downloads_in(synced: Path) -> list[dict]:
    """The download records of the synced folder ``synced`` (see :func:`downloads`)."""
    try:
        text = (synced.parent / f"{synced.name}.downloads.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _prune_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m mllm_msr.model_source prune",
        description="Remove synced models that are out of date from a node's cache.",
    )
    ap.add_argument(
        "--cache-dir",
        default=None,
        help=f"the node's cache (default: ${NODE_CACHE_ENV}, else $MLLM_MSR_CACHE)",
    )
    ap.add_argument(
        "--keep",
        action="append",
        default=None,
        metavar="URI",
        help="a model URI to keep (repeat it); every other synced model is removed",
    )
    ap.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")
    args = ap.parse_args(argv)
    cache = args.cache_dir or os.environ.get(NODE_CACHE_ENV) or os.environ.get("MLLM_MSR_CACHE")
    if not cache:
        ap.error(f"no cache: pass --cache-dir or set {NODE_CACHE_ENV} or MLLM_MSR_CACHE")
    removed = prune(cache, args.keep, args.dry_run)
    print(f"{'would remove' if args.dry_run else 'removed'} {len(removed)} folder(s) from {cache}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prune"]:
        _prune_main(argv[1:])
        return
    ap = argparse.ArgumentParser(
        prog="python -m mllm_msr.model_source",
        description="Publish a model folder to object storage with its sha256 manifest "
        "(`python -m mllm_msr.model_source prune --help`: clean a node's cache).",
    )
    ap.add_argument("local_dir", help="the model folder (config.json, weights, tokenizer...)")
    ap.add_argument("dest", help="where nodes sync it from, e.g. s3://bucket/models/<name>")
    args = ap.parse_args(argv)
    manifest = publish_models(args.local_dir, args.dest)
    size = sum(f["size"] for f in manifest["files"].values())
    print(f"published {len(manifest['files'])} files ({size} bytes) to {args.dest}")


if __name__ == "__main__":
    main()
