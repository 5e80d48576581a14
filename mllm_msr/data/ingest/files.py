"""Raw-data files under a local path or any pyarrow filesystem URI (``s3://bucket/raw``...).

``ingest.root`` (and the files and image folders named relative to it) may live on object
storage, so that every node of a cluster reads the same raw data. A path without ``://`` is a
local path and is used as before; a URI is opened through ``pyarrow.fs.FileSystem.from_uri``,
which reads the endpoint, region and credentials of object storage from the standard AWS
environment variables and config files (as the run directory does, see :mod:`mllm_msr.runtime`).
Ray Data reads the same URIs itself.
"""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    """True for a URI (``s3://...``, ``gs://...``); False for a local path or ``file://``."""
    return "://" in path and not path.startswith("file://")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``path`` and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).absolute())


def join(root: str, relative: str) -> str:
    """``relative`` under ``root`` (a local path or a URI)."""
    if is_remote(root):
        return root.rstrip("/") + "/" + relative.lstrip("/")
    return str(Path(root) / relative)


def _uri(like: str, fs_path: str) -> str:
    """The path ``fs_path`` of the filesystem of ``like`` written the way ``like`` is."""
    if is_remote(like):
        return like.split("://", 1)[0] + "://" + fs_path
    return fs_path


def file_type(path: str) -> pafs.FileType:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type


def is_dir(path: str) -> bool:
    return file_type(path) == pafs.FileType.Directory


def is_file(path: str) -> bool:
    return file_type(path) == pafs.FileType.File


def list_files(folder: str, recursive: bool = False) -> list[str]:
    """The files under ``folder`` (paths or URIs, as ``folder`` is written), sorted."""
    fs, p = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive, allow_not_found=True))
    return sorted(_uri(folder, i.path) for i in infos if i.type == pafs.FileType.File)


def glob(folder: str, pattern: str) -> list[str]:
    """The files directly under ``folder`` whose name matches ``pattern`` (``fnmatch``), sorted."""
    return [f for f in list_files(folder) if fnmatch.fnmatch(posixpath.basename(f), pattern)]


def open_input(path: str) -> Any:
    """A binary input stream of the file ``path`` (a context manager)."""
    if not is_remote(path):
        return open(path.removeprefix("file://"), "rb")
    fs, p = filesystem(path)
    return fs.open_input_stream(p)


def check_root(root: str, fmt: str) -> None:
    """Raise when the folder ``ingest.root`` does not exist (a clear error naming the setting)."""
    try:
        kind = file_type(root)
    except OSError as exc:  # unreachable endpoint, no credentials, no such bucket...
        raise FileNotFoundError(
            f"ingest.root={root!r} (format={fmt}) cannot be read: {exc}. Set ingest.root to the "
            "folder of the raw data (a local path or a pyarrow URI such as s3://bucket/raw; the "
            "endpoint and credentials come from the AWS_* environment variables)"
        ) from None
    if kind != pafs.FileType.Directory:
        what = "is a file, not a folder" if kind == pafs.FileType.File else "does not exist"
        raise FileNotFoundError(
            f"ingest.root={root!r} (format={fmt}) {what}: set ingest.root to the folder of the "
            "raw data (a local path or a pyarrow URI such as s3://bucket/raw)"
        )
