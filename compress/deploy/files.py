"""Files written atomically and read without unpickling arbitrary objects.

Every file this library writes goes through :func:`atomic_write` (a temporary file beside the
target, renamed onto it), and every ``torch.save`` file it reads goes through :func:`safe_load`
(``weights_only=True``, with the zip CRC checked first).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Calls ``write(tmp_path)`` and renames the result onto ``path``; on any failure the
    temporary file is removed and a previous file at ``path`` is left intact.

    The file gets the mode ``open`` would give it (0666 less the umask), not mkstemp's 0600.
    Temporary files that killed writers left beside ``path`` are removed first (their names
    carry the writer's process id). A failure to write (a full disk, a read-only directory, a
    parent that is a file) is a ``CompressError`` naming the path and the cause.
    """
    return atomic_write_files([path], lambda tmps: write(tmps[0]))[0]


def atomic_write_files(
    paths: Sequence[str | os.PathLike[str]], write: Callable[[list[str]], object]
) -> list[Path]:
    """:func:`atomic_write` for files that belong together, such as OpenVINO's ``.xml`` and
    ``.bin``: they share a directory and a stem and differ in their suffix. ``write(tmps)``
    writes every temporary file (the temporary names share one stem too, as the files do);
    then each is renamed onto its path. A failure before the renames leaves the previous files
    intact; a failure between them puts the previous files back (from hard links made before
    the first rename), so the files are never of two different writes.
    """
    targets = [Path(p) for p in paths]
    first = targets[0]
    assert all(t.parent == first.parent and t.stem == first.stem for t in targets), targets
    for parent in (first.parent, *first.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise CompressError(f"{first}: cannot write here ({parent} is a file, not a directory)")
    try:
        first.parent.mkdir(parents=True, exist_ok=True)
        for target in targets:
            _remove_stale(target)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{first.stem}.{os.getpid()}.", suffix=".tmp" + first.suffix, dir=first.parent
        )
    except OSError as e:
        raise CompressError(f"{first}: cannot write here ({_cause(e, first)})") from None
    stem = tmp.removesuffix(first.suffix)  # .STEM.PID.RANDOM.tmp
    tmps = [stem + t.suffix for t in targets]
    backups = [stem.removesuffix(".tmp") + "-old.tmp" + t.suffix for t in targets]
    renamed: list[int] = []
    try:
        os.close(fd)
        write(tmps)
        for t in tmps:
            with open(t, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(t, 0o666 & ~_umask())
        if len(targets) > 1:
            for target, backup in zip(targets, backups, strict=True):
                if target.exists():
                    os.link(target, backup)
        for i, (t, target) in enumerate(zip(tmps, targets, strict=True)):
            os.replace(t, target)
            renamed.append(i)
    except BaseException as e:
        for i in renamed:  # put the previous files back: never a mix of two writes
            with contextlib.suppress(OSError):
                if os.path.exists(backups[i]):
                    os.rename(backups[i], targets[i])
                else:
                    os.remove(targets[i])
        _remove_all(tmps + backups)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CompressError):
            raise CompressError(
                f"{first}: the export failed ({_cause(e, first)}); a previous file is intact"
            ) from e
        raise
    _remove_all(backups)
    return targets


def _remove_all(paths: Sequence[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.remove(p)


def save_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> Path:
    """Writes ``data`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def torch_save(path: str | os.PathLike[str], payload: object) -> Path:
    """``torch.save`` into memory, then :func:`save_bytes`: a full disk then fails in Python's
    own write, with errno ENOSPC, rather than inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return save_bytes(path, buffer.getbuffer())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale(path: Path) -> None:
    """Removes temporary files of ``path`` whose writer process no longer runs."""
    for tmp in path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"):
        pid = tmp.name[len(path.stem) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cause(e: BaseException, path: Path) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"{os.strerror(e.errno)}, errno {errno.errorcode.get(e.errno, e.errno)}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path.parent).free
        if free < 1 << 20:
            return f"no space left on device: {free} bytes free; {text}"
    return text


def check_zip_crc(path: Path) -> None:
    """torch.load does not check the CRC-32 that torch.save writes for every record, so a
    flipped byte in tensor data would load as a silently wrong weight. Checked here."""
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load reports it
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # a damaged archive raises many kinds (BadZipFile, decode errors)
        raise CompressError(f"{path}: the file is damaged ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CompressError(f"{path}: the file is damaged (checksum mismatch in record {bad!r})")


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    check_zip_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for damaged or unsafe files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise CompressError(
                f"{path}: refused to load: the file holds Python objects that are not plain "
                "tensors (a pickle payload); only files written by this library load"
            ) from None
        if "WeightsUnpickler error" in str(e):
            text = str(e).split("WeightsUnpickler error:")[1].strip().splitlines()[0]
        raise CompressError(f"{path}: not a readable file of this library ({text})") from None


# Zeros of the stored input shapes are made only up to this many elements in all (1 GiB of
# float32): a file's header must not be able to ask for any amount of memory.
MAX_INPUT_ELEMENTS = 2**28
_INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "bool")


def stored_inputs(payload: Mapping[str, Any], path: str | Path) -> list[torch.Tensor] | None:
    """Zero tensors of the ``input_shapes``/``input_dtypes`` a file stores (None if none),
    checked for type and total size before they are made."""
    if "input_shapes" not in payload:
        return None
    shapes, dtypes = payload["input_shapes"], payload.get("input_dtypes")
    if (
        not isinstance(shapes, list)
        or not isinstance(dtypes, list)
        or len(shapes) != len(dtypes)
        or not all(isinstance(s, list) for s in shapes)
    ):
        raise CompressError(f"{path}: input_shapes/input_dtypes are not two lists of one length")
    total = 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise CompressError(f"{path}: input shape {shape!r} is not a list of sizes")
        if dtype not in _INPUT_DTYPES:
            raise CompressError(f"{path}: input dtype {dtype!r} is not one of {_INPUT_DTYPES}")
        total += math.prod(shape)
    if total > MAX_INPUT_ELEMENTS:
        raise CompressError(
            f"{path}: the stored input shapes {shapes} hold {total} elements, more than "
            f"{MAX_INPUT_ELEMENTS}; the file is damaged or crafted (pass example_inputs)"
        )
    return [torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes, strict=True)]
