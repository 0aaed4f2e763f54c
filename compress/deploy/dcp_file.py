"""Reads the model's tensors of a distributed checkpoint directory (Lightning's
``ModelParallelStrategy(save_distributed_checkpoint=True)``) without unpickling code.

torch's reader unpickles the directory's ``.metadata`` with plain ``pickle``: a crafted file
could run code. Here it is read by an unpickler that builds only the classes torch's
checkpoint metadata is made of (its dataclasses, ``torch.Size``, dtypes, layouts, paths),
from at most :data:`MAX_METADATA_BYTES`; the tensors themselves are read by torch
(``weights_only`` loads and raw bytes).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from compress.deploy.files import read_bytes
from compress.errors import CompressError

__all__ = ["MAX_METADATA_BYTES", "read_metadata", "read_state_dict"]

MAX_METADATA_BYTES = 256 << 20
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(path: Path) -> Metadata:
    """The ``Metadata`` of the checkpoint directory ``path``, or a ``CompressError``."""
    data = read_bytes(path / ".metadata", MAX_METADATA_BYTES)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any malformed pickle: say what and where
        raise CompressError(
            f"{path / '.metadata'}: not a checkpoint's metadata ({e}); refused"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CompressError(f"{path / '.metadata'}: holds {type(metadata).__name__}, not Metadata")
    return metadata


class _Reader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        meta.load_id = self.load_id
        metadata.storage_meta = meta
        return metadata


def read_state_dict(path: Path) -> Any:
    """The ``state_dict`` entry of the checkpoint directory ``path``, read whole in this one
    process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    read_metadata(path)  # its errors as they are, before torch wraps them
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            state = _load_state_dict_from_keys("state_dict", storage_reader=_Reader(path))
    except Exception as e:  # torch's CheckpointException holds the cause as text
        first = str(e).strip().splitlines()[-1]
        raise CompressError(f"{path}: the distributed checkpoint does not load ({first})") from None
    return state["state_dict"]
