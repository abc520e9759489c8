"""Writing output files: atomically (temp file, then rename), with the permissions the user's umask
gives every other file, and byte-identical for identical content."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

__all__ = ["umask", "use_umask", "write_safetensors", "write_safetensors_with"]


def umask() -> int:
    """The process's file-creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have (temp files are created 0600/0700)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask())


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` with ``meta`` as JSON under the header key ``diffq``, atomically and with the
    umask's mode. The JSON keeps ``meta``'s order (readers rebuild keyword order from it), so ``meta``
    must be built in a deterministic order for identical content to give identical bytes."""
    write_safetensors_with(path, tensors, {"diffq": json.dumps(meta, default=str)})


def write_safetensors_with(path: Path, tensors: Mapping[str, torch.Tensor], header: Mapping[str, str]) -> None:
    """Write ``tensors`` with the string ``header`` entries as the file's metadata, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(header))
    use_umask(tmp)
    os.replace(tmp, path)
