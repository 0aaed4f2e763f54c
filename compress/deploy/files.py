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
import stat
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


# No file this library reads may be larger than this (a crafted size is refused before reading).
MAX_FILE_BYTES = 16 * 2**30
# Nesting deeper than this in a loaded file is refused (a file of this library nests about 8 deep).
MAX_DEPTH = 100


def check_regular(path: str | Path, limit: int = MAX_FILE_BYTES) -> int:
    """The size of ``path``, a regular file of at most ``limit`` bytes; a FIFO, a device such
    as ``/dev/zero`` or a directory is refused without opening it (opening a FIFO blocks)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CompressError(f"{path}: no such file ({_cause(e, Path(path))})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CompressError(f"{path}: not a regular file (a directory, device or FIFO); refused")
    if st.st_size > limit:
        raise CompressError(f"{path}: {st.st_size} bytes, more than the {limit} read; refused")
    return st.st_size


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`check_regular`),
    never more than ``limit`` even if the file grows while it is read."""
    check_regular(path, limit)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CompressError(f"{path}: more than the {limit} bytes read; refused")
    return data


def check_zip(path: Path) -> None:
    """Checks a zip archive (``torch.save``'s format and ``.pt2``) against the bytes it holds
    before any record is read: torch writes every record uncompressed, once, so a compressed
    (deflated) record, a declared size other than the bytes stored, two directory entries for
    one record, or records adding up to more than the file are refused. Then torch.load does
    not check the CRC-32 that torch.save writes for every record, so a flipped byte in tensor
    data would load as a silently wrong weight: checked here, reading each record once."""
    size = check_regular(path)
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load reports it
    try:
        with zipfile.ZipFile(path) as z:
            _check_records(z.infolist(), size, path)
            bad = z.testzip()
    except CompressError:
        raise
    except Exception as e:  # a damaged archive raises many kinds (BadZipFile, decode errors)
        raise CompressError(f"{path}: the file is damaged ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CompressError(f"{path}: the file is damaged (checksum mismatch in record {bad!r})")


def _check_records(infos: list[zipfile.ZipInfo], size: int, path: Path) -> None:
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED:
            raise CompressError(
                f"{path}: record {name!r} is compressed, which torch never writes; "
                "the file is damaged or crafted"
            )
        if info.compress_size != info.file_size or info.header_offset + info.file_size > size:
            raise CompressError(
                f"{path}: record {name!r} declares {info.file_size} bytes but stores "
                f"{info.compress_size} (the file has {size}); the file is damaged or crafted"
            )
        if info.header_offset < end:
            raise CompressError(
                f"{path}: record {name!r} overlaps the record before it (one record listed "
                "twice); the file is damaged or crafted"
            )
        end = info.header_offset + info.file_size
    if sum(i.file_size for i in infos) > size:
        raise CompressError(f"{path}: its records declare more bytes than the file holds")


def check_tensor(t: torch.Tensor, what: str) -> None:
    """Refuses a tensor read from a file whose view reaches more elements than its storage
    holds (a zero stride, overlapping strides, a storage too small): copying it would allocate
    what the view declares, not what the file stores (``ones(1).expand(30000, 30000)`` is
    7.2 GB from a 1.7 kB file)."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True)):
        raise CompressError(
            f"{what}: a tensor of shape {list(t.shape)} with strides {list(t.stride())} (a zero "
            "stride repeats one value); files of this library hold plain tensors; refused"
        )
    stored = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if t.numel() * t.element_size() > stored:
        raise CompressError(
            f"{what}: a tensor of shape {list(t.shape)} ({t.numel() * t.element_size()} bytes) "
            f"views a storage of {stored} bytes; the file is damaged or crafted; refused"
        )


def check_loaded(payload: Any, path: str | Path) -> None:
    """Every tensor of a loaded file passes :func:`check_tensor`, and nothing nests more than
    :data:`MAX_DEPTH` deep (walked without recursion, so a 100,000-deep list is an error).
    ``path`` names the file, or what else was loaded (a checkpoint entry on resume)."""
    stack: list[tuple[Any, str, int]] = [(payload, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CompressError(
                f"{path}: {where[:80]}... nests more than {MAX_DEPTH} deep; the file is damaged "
                "or crafted; refused"
            )
        if isinstance(value, torch.Tensor):
            check_tensor(value, f"{path}: {where or 'the payload'}")
        elif isinstance(value, dict):
            stack.extend((v, f"{where}[{k!r}]", depth + 1) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem."""
    path = Path(path)
    check_zip(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
    check_loaded(payload, path)
    return payload


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
    if not isinstance(shapes, list) or not isinstance(dtypes, list) or len(shapes) != len(dtypes):
        raise CompressError(f"{path}: input_shapes/input_dtypes are not two lists of one length")
    return zero_inputs(list(zip(shapes, dtypes, strict=True)), f"{path}: input_shapes")


def zero_inputs(pairs: Any, what: str) -> list[torch.Tensor]:
    """Zero tensors of ``[shape, dtype]`` pairs read from a file, each shape a list of
    non-negative ints and each dtype one of a few names, refused before anything is made if
    they hold more than :data:`MAX_INPUT_ELEMENTS` elements in all."""
    if not isinstance(pairs, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs
    ):
        raise CompressError(f"{what}: {str(pairs)[:80]} is not a list of [shape, dtype] pairs")
    total = 0
    for shape, dtype in pairs:
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise CompressError(f"{what}: input shape {str(shape)[:80]} is not a list of sizes")
        if not isinstance(dtype, str) or dtype not in _INPUT_DTYPES:
            raise CompressError(
                f"{what}: input dtype {str(dtype)[:40]!r} is not one of {_INPUT_DTYPES}"
            )
        total += math.prod(shape)
    if total > MAX_INPUT_ELEMENTS:
        raise CompressError(
            f"{what}: the input shapes {[p[0] for p in pairs]} hold {total} elements, more than "
            f"{MAX_INPUT_ELEMENTS}; the file is damaged or crafted (pass example_inputs)"
        )
    return [torch.zeros(s, dtype=getattr(torch, d)) for s, d in pairs]
