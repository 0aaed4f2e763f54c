"""Run unstructured-sparse layers with sparse CPU kernels, only where that is measurably faster.

Zeros in a dense weight save nothing at inference: a dense GEMM multiplies them anyway. Stored
as CSR (or BSR when the zeros come in square blocks), the weight is read and multiplied only
where it is non-zero. Whether that wins depends on the sparsity, the layer size, the batch and
the CPU, so :func:`to_sparse_runtime` does not guess: it runs ``example_inputs`` once, captures
the activation that reaches each candidate layer, times the dense layer against its sparse
replacement on that activation, and converts only layers that are at least ``min_speedup``
times faster. Layers it cannot help are left as they are, so the converted model is never
slower than the dense one on inputs shaped like ``example_inputs``.

Candidates are ``nn.Linear`` (any leading dims) and 1x1 ``nn.Conv2d`` with stride 1, no
padding and ``groups=1``, which is a matmul over the channel dim. Everything else (3x3 convs,
attention, norms) is left alone.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 8))
    >>> with torch.no_grad():  # 98% of the large layer's weights are zero
    ...     model[0].weight[model[0].weight.abs() < 0.98 * 2048**-0.5] = 0
    >>> fast = to_sparse_runtime(model, torch.randn(1, 2048))
    >>> [(layer.name, layer.converted) for layer in fast.runtime_report.layers]  # doctest: +SKIP
    [('0', True), ('2', False)]

    The small, dense output layer stays dense: sparse kernels would not be faster there. (The
    verdicts come from timing on this machine, so the doctest does not check them.)
"""

from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.deploy.runtime_report import LayerKind, LayerRuntime, RuntimeReport, report_from_dict
from compress.deploy.sparse_layers import SparseConv1x1, SparseLinear, SparseMatmul
from compress.errors import ConfigError
from compress.sparsity.importance import block_scores

__all__ = ["RuntimeReport", "report_from_dict", "to_sparse_runtime"]

Timer = Callable[[Callable[[], object]], float]
"""Times one call of ``fn`` and returns seconds; injectable so tests can fix every decision."""

# MKL's BSR kernel rejects non-square blocks. On our 2-core AVX-512 CPU, 8x8 blocks beat CSR
# at batch 1 by about 2x on block-pruned weights (see docs/sparse_runtime.md).
_BSR_BLOCKS = (4, 8, 16, 32)
# A block size is tried only if its blocks are mostly non-zero: BSR stores the zeros inside a
# kept block, so a scattered (unstructured) pattern would make it read more, not less.
_BSR_MIN_FILL = 0.5
# Rounds of timing per layer, alternating dense and sparse (see _time_interleaved).
_ROUNDS = 3
# Tolerance of the conversion-time check that the sparse layer reproduces the dense one. Sparse
# kernels sum in a different order, so exact equality is not expected.
_CHECK_RTOL = 1e-4
_CHECK_ATOL_REL = 1e-5


def median_timer(fn: Callable[[], object], *, repeats: int = 7, target_s: float = 2e-3) -> float:
    """Seconds per call of ``fn``: warm up, then the median of ``repeats`` short timed runs.

    Each run loops ``fn`` enough times to last about ``target_s``, because a single call of a
    small layer is shorter than the noise of the clock and the scheduler.
    """
    with torch.no_grad():
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        loops = max(1, min(200, int(target_s / once)))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            runs.append((time.perf_counter() - start) / loops)
    return statistics.median(runs)


def to_sparse_runtime(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    min_speedup: float = 1.1,
    timer: Timer | None = None,
    threads: int | None = None,
) -> nn.Module:
    """Return a copy of ``model`` whose sparse-enough layers run with sparse kernels.

    ``example_inputs`` should look like production inputs (same batch size): a layer's verdict
    holds for the activation shapes it was timed with. ``model`` itself is not modified. The
    copy carries ``runtime_report`` (a :class:`RuntimeReport`).

    ``min_speedup=0`` converts every layer the sparse kernels reproduce, whatever the timing
    says (the end-to-end check is skipped too), so the result does not depend on machine load.

    ``timer(fn) -> seconds`` does all timing. Each ``fn`` is ``functools.partial(layer,
    activation)``, so a test timer can tell the dense layer from ``SparseLinear`` or
    ``SparseConv1x1`` by ``fn.func``. Default: :func:`median_timer`.

    ``threads`` sets how many threads the sparse kernels use (``torch.set_num_threads`` around
    each kernel call, restored after it). ``None``: with more than one thread in the process, the
    converted model is timed end to end with its kernels on all threads and on one, and the
    faster is kept (the report's ``sparse_threads``; 0 means all).

    Converted layers hold buffers, not parameters: the result is for inference, not training.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2048, 2048)
        >>> with torch.no_grad():  # 98% zeros
        ...     layer.weight[layer.weight.abs() < 0.98 * 2048**-0.5] = 0
        >>> fast = to_sparse_runtime(layer, torch.randn(1, 2048))
        >>> type(fast).__name__, fast.runtime_report.converted  # doctest: +SKIP
        ('SparseLinear', [''])
        >>> [layer.name for layer in fast.runtime_report.layers]  # timed, whatever the verdict
        ['']
    """
    _check_arguments(model, example_inputs, min_speedup)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(
            f"to_sparse_runtime: threads={threads!r} is not allowed; use None (measure all "
            "threads against one) or a thread count >= 1"
        )
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    out = _copy(model)
    candidates = {name: m for name, m in out.named_modules() if _kind(m) is not None}
    activations = _capture_inputs(out, inputs, candidates)
    time_fn = timer if timer is not None else median_timer
    layers = []
    for name, module in candidates.items():
        layer, replacement = _decide(name, module, activations.get(name), min_speedup, time_fn)
        layers.append(layer)
        if replacement is not None:
            out = _replace(out, name, replacement)
    sparse_threads, slower = 0, False
    if any(layer.converted for layer in layers):
        out, sparse_threads, slower = _end_to_end(model, out, inputs, time_fn, threads)
    if slower and min_speedup > 0:  # min_speedup=0: convert whatever the timing
        # Layers that win alone can still lose inside the model (tiny layers, cache effects):
        # the promise is a model never slower than the dense one, so keep the dense copy.
        out = _copy(model)
        layers = [
            replace(layer, converted=False, layout="dense", reason=_SLOWER_WHOLE)
            if layer.converted
            else layer
            for layer in layers
        ]
    converted = any(layer.converted for layer in layers)
    report = RuntimeReport(
        layers=tuple(layers),
        min_speedup=float(min_speedup),
        sparse_threads=sparse_threads if converted else 0,
    )
    setattr(out, "runtime_report", report)  # noqa: B010  (mypy: nn.Module attrs are tensors)
    return out


_SLOWER_WHOLE = "the converted model timed slower end to end"


def _set_threads(model: nn.Module, threads: int) -> nn.Module:
    for m in model.modules():
        if isinstance(m, SparseMatmul):
            m.threads = threads
    return model


def _end_to_end(
    dense: nn.Module,
    sparse: nn.Module,
    inputs: tuple[Tensor, ...],
    timer: Timer,
    threads: int | None,
) -> tuple[nn.Module, int, bool]:
    """(converted model, its sparse kernels' threads, whether it is slower than the dense one
    on ``inputs``). Best of rounds, taking turns, like the per-layer timing; with ``threads``
    None and several threads, a copy with one-thread kernels takes its turn too."""
    variants = [dense, _set_threads(sparse, threads or 0)]
    if threads is None and torch.get_num_threads() > 1:
        variants.append(_set_threads(copy.deepcopy(sparse), 1))
    rounds = [[timer(functools.partial(m, *inputs)) for m in variants] for _ in range(_ROUNDS)]
    best = [min(column) for column in zip(*rounds, strict=True)]
    chosen = 2 if len(variants) == 3 and best[2] < best[1] else 1
    model = variants[chosen]
    return model, (1 if chosen == 2 else threads or 0), best[chosen] > best[0]


def _check_arguments(model: object, example_inputs: object, min_speedup: object) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"to_sparse_runtime: model must be an nn.Module, got {type(model)}")
    items = [example_inputs] if isinstance(example_inputs, Tensor) else example_inputs
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, Tensor) for t in items):
        raise ConfigError(
            f"to_sparse_runtime: example_inputs must be a Tensor or a tuple of Tensors, got "
            f"{type(example_inputs).__name__}; HINT: pass a batch shaped like production inputs"
        )
    if (
        isinstance(min_speedup, bool)
        or not isinstance(min_speedup, (int, float))
        or not (0 <= min_speedup < math.inf)
    ):
        raise ConfigError(
            f"to_sparse_runtime: min_speedup={min_speedup!r} is not allowed; use a finite number "
            ">= 0 (1.1 keeps a layer dense unless sparse is at least 10% faster)"
        )


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:
        raise ConfigError(
            f"to_sparse_runtime: cannot copy the model ({str(err).splitlines()[0]}); HINT: "
            "fold masks first (ctrl.strip(), or torch.nn.utils.prune.remove for torch pruning)"
        ) from None


def _kind(module: nn.Module) -> LayerKind | None:
    """The candidate kind of ``module``, or None. Exact types: a subclass may change forward."""
    if type(module) is nn.Linear:
        return "linear"
    if (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid", "same")
    ):
        return "conv1x1"
    return None


def _capture_inputs(
    model: nn.Module, inputs: tuple[Tensor, ...], candidates: dict[str, nn.Module]
) -> dict[str, Tensor]:
    """Run ``model`` once in eval mode and keep the first input each candidate receives.

    Eval mode so that BatchNorm statistics of the copy do not move; each module's own training
    flag is restored afterwards.
    """
    captured: dict[str, Tensor] = {}

    def hook(name: str, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if name not in captured and args and isinstance(args[0], Tensor):
            captured[name] = args[0].detach()

    handles = [
        m.register_forward_pre_hook(functools.partial(hook, name))
        for name, m in candidates.items()
        if not _has_hooks(m)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return captured


def _has_hooks(module: nn.Module) -> bool:
    """Masks, ``torch.nn.utils.prune`` and parametrizations change what forward computes."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks or parametrize.is_parametrized(module)
    )


def _decide(
    name: str,
    module: nn.Module,
    activation: Tensor | None,
    min_speedup: float,
    timer: Timer,
) -> tuple[LayerRuntime, nn.Module | None]:
    """Time ``module`` against its sparse variants on ``activation``; return the verdict."""
    kind = _kind(module)
    assert kind is not None
    weight = cast(Tensor, module.weight).detach()
    sparsity = float((weight == 0).sum()) / max(1, weight.numel())

    def skipped(reason: str) -> tuple[LayerRuntime, None]:
        layer = LayerRuntime(
            name, kind, tuple(weight.shape), sparsity, None, None, None, False, reason=reason
        )
        return layer, None

    if _has_hooks(module):
        return skipped("has hooks or parametrizations; strip masks first")
    if not weight.is_floating_point():
        return skipped(f"weight dtype {weight.dtype} is not floating point")
    if activation is None:
        return skipped("not reached by example_inputs")

    with torch.no_grad():
        expected = module(activation)
    variants: list[nn.Module] = [module]
    failures = []
    for variant in _sparse_variants(module, kind, weight):
        try:
            with torch.no_grad():
                got = variant(activation)
        except RuntimeError as err:  # a dtype or device the sparse kernels do not support
            failures.append(f"{variant.layout} failed: {str(err).splitlines()[0]}")
            continue
        if _close(got, expected):
            variants.append(variant)
        else:
            failures.append(f"{variant.layout} output differs")
    if len(variants) == 1:
        return skipped("; ".join(failures) or "no sparse variant")

    seconds = _time_interleaved(variants, activation, timer)
    best = min(range(1, len(variants)), key=seconds.__getitem__)
    dense_s, sparse_s = seconds[0], seconds[best]
    fastest = cast(SparseMatmul, variants[best])
    speedup = dense_s / sparse_s if sparse_s > 0 else math.inf
    converted = speedup >= min_speedup
    reason = "" if converted else f"{fastest.layout} speed-up below {min_speedup:g}"
    layer = LayerRuntime(
        name=name,
        kind=kind,
        shape=tuple(weight.shape),
        sparsity=sparsity,
        dense_ms=dense_s * 1e3,
        sparse_ms=sparse_s * 1e3,
        speedup=speedup,
        converted=converted,
        layout=fastest.layout if converted else "dense",
        reason=reason,
    )
    return layer, (fastest if converted else None)


def _time_interleaved(modules: list[nn.Module], activation: Tensor, timer: Timer) -> list[float]:
    """Best of ``_ROUNDS`` timings of each module, taking turns.

    On a shared machine another process can stall one measurement for a whole scheduler
    quantum; taking turns exposes every variant to the same load, and the best round is the
    one least disturbed.
    """
    rounds = [[timer(functools.partial(m, activation)) for m in modules] for _ in range(_ROUNDS)]
    return [min(column) for column in zip(*rounds, strict=True)]


def _sparse_variants(module: nn.Module, kind: LayerKind, weight: Tensor) -> list[SparseMatmul]:
    """CSR always; BSR for each square block size whose blocks are mostly non-zero."""
    build: Callable[..., SparseMatmul] = SparseLinear if kind == "linear" else SparseConv1x1
    variants = [build(module)]
    weight2d = weight.flatten(1)
    nnz = int((weight2d != 0).sum())
    rows, cols = weight2d.shape
    for size in _BSR_BLOCKS:
        if nnz == 0 or rows % size or cols % size:
            continue
        kept_blocks = int((block_scores(weight2d, (size, size)) > 0).sum())
        if nnz / (kept_blocks * size * size) >= _BSR_MIN_FILL:
            variants.append(build(module, blocksize=size))
    return variants


def _close(got: Tensor, expected: Tensor) -> bool:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = _CHECK_ATOL_REL * max(scale, 1e-12)
    return got.shape == expected.shape and torch.allclose(got, expected, _CHECK_RTOL, atol)


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` in ``root``; the root itself when ``name`` is ''."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, new)
    return root
