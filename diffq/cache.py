"""Content-addressed on-disk cache of tensors (calibration sets, FID reference statistics).

Each entry is one safetensors file named by the hash of the JSON key that produced it, with
its structure (non-tensor values, nesting) in the header metadata. Writes are atomic.
:func:`cache_key` also names the cached FP sample folders and calibration pools;
:func:`cache_lock` makes parallel jobs of a sweep (joblib, submitit) compute an entry once: the
others wait for it and read it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open

from diffq.files import write_safetensors

log = logging.getLogger(__name__)


def cache_key(payload: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable key."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@contextlib.contextmanager
def cache_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``<path>.lock`` while computing the cache entry ``path`` (``what``, for the log): a process
    that finds it held waits until the holder is done, then reads the holder's entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process computing %s (%s.lock)", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cache_path(cache_dir: str | os.PathLike, kind: str, key: str) -> Path:
    """Where the entry ``key`` of kind ``kind`` lives."""
    return Path(os.path.expanduser(str(cache_dir))) / kind / f"{key}.safetensors"


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors + JSON metadata atomically (temp file, then rename)."""
    write_safetensors(path, tensors, meta)


def load_meta(path: Path) -> dict[str, Any] | None:
    """An entry's JSON metadata without reading its tensors; None when missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("diffq", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError):
        return None


UNREADABLE = (SafetensorError, OSError, ValueError, json.JSONDecodeError)  # what a truncated or foreign file raises


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An entry's tensors and metadata; one of :data:`UNREADABLE` when the file is missing or corrupt."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("diffq", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Read a cache entry; None when it is missing, or unreadable (with a warning: the caller recomputes it)."""
    if not path.exists():
        return None
    try:
        return read_tensors(path)
    except UNREADABLE as e:
        log.warning("cache entry %s is unreadable (%s); recomputing it", path, e)
        return None
