"""Local paths and URIs (``s3://bucket/key``, ``file://``, anything pyarrow opens) in one place.

Every module that reads or writes a model directory, a data set or a report goes through
these helpers, so "is it a URI or a path?" is answered once. Credentials and endpoints for
object storage come from the standard AWS environment (pyarrow's S3 filesystem reads it).
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A path or URI that cannot be opened (bad scheme, unreachable store)."""


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (has a scheme) rather than a local path."""
    return "://" in location


def is_remote(location: str) -> bool:
    """Whether ``location`` lives outside this machine's file system."""
    return is_uri(location) and not location.startswith("file://")


def absolute(location: str) -> str:
    """A URI unchanged; a local path made absolute (workers and replicas may run elsewhere)."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path within it) for a local path or URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), absolute(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise StorageError(f"cannot open {location}: {e}") from None


def join(location: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    return "/".join([location.rstrip("/"), *[p.strip("/") for p in parts]])


def read_bytes(location: str) -> bytes:
    """Read a whole file from a local path or URI."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file to a local path or URI (parent folders created)."""
    fs, path = resolve(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(location: str) -> bool:
    """Whether a file or folder exists at a local path or URI."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def location_key(location: str) -> str:
    """A comparable name of a place: the file system's type and the normalised path."""
    fs, path = resolve(location)
    return f"{fs.type_name}:{path.rstrip('/')}"


def filesystem_of(location: str) -> Any:
    """Just the pyarrow FileSystem of ``location`` (for Ray Data's ``filesystem=``)."""
    return resolve(location)[0]


def copy_folder(source: str, destination: str) -> None:
    """Copy every file under ``source`` to ``destination`` (paths or URIs, either kind), replacing
    files of the same name there."""
    src_fs, src = resolve(source)
    dst_fs, dst = resolve(destination)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
