"""Latency-aware filter pruning: a table of measured layer times, and the widths it chooses.

A MAC removed is not a millisecond saved: a CPU runs narrow or odd-width layers less
efficiently than wide ones (oneDNN computes convolutions in blocks of 16 channels, so 24
channels can cost what 32 do). So ``pruning_latency_target`` does not count MACs; before pruning
starts, :func:`measure_table` times every layer a channel group touches, on this machine, at a
few candidate widths of that group (the activation shapes the example inputs produce, at the
recipe's batch size), and the rest of the model by running it with those layers replaced by
their recorded outputs.

Two builds on one machine must choose the same widths, so the table is measured until it
settles and says how well it knows each time: every job (a layer variant, the whole model,
the rest) takes a turn in each round, in an order shuffled per round; each sample loops its
call for about as long as one call of the whole model (2 to 20 ms), so that when other
processes take a share of the CPU they slow long and short calls alike (with 2 ms samples a
loaded machine inflated the rest, timed as one long call, by 1x to 2.6x from one build to the
next, while the layers read clean); rounds go on from 5 until every median's spread
(:func:`median_spread`) is within 2% of it, or 20 rounds are done. Each time is kept with its
spread, which :func:`compress.pruning.latency_widths.choose_widths` takes as the size of a
difference that does not count.
:func:`compress.pruning.latency_widths.choose_widths` then picks per-group widths that reach a
fraction of latency removed while removing the least importance.

The table is a plain dict (JSON and ``torch.load(weights_only=True)`` friendly)::

    {"backend": "torch", "batch_size": 64, "model_ms": 12.3, "rest_ms": 2.1,
     "model_spread": 0.1, "rest_spread": 0.02, "rounds": 7, "spread_bound": 0.02,
     "sample_ms": 12.0, "volume_total": 81920,
     "groups": {"layer1.0.conv1": {"size": 32, "widths": [8, 16, 24, 32], "volume": 8192}},
     "layers": {"layer1.0.conv1": {"ms": 1.2, "spread": 0.01,
                                   "out": {"group": "layer1.0.conv1", "ms": [0.4, 0.6, 1.1, 1.2],
                                           "spread": [0.01, 0.01, 0.02, 0.01]},
                                   "in": [{"group": "conv1", "ms": [...], "spread": [...]}]},
                "stem": {"ms": 0.9, "spread": 0.01, "out": None, "in": []}}}  # timed whole

Example:
    >>> import torch
    >>> from torch import nn
    >>> from compress.pruning.channel_groups import build_groups
    >>> from compress.pruning.latency_widths import choose_widths, removed_fraction
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> groups = build_groups(model, x, prune_first_conv=True)
    >>> table = measure_table(model, groups, (x,), timer=layer_macs_timer)  # planned "times"
    >>> table["groups"]["0"]["widths"]
    [8, 16]
    >>> widths = choose_widths(table, {"0": torch.arange(16.0)}, 0.5)
    >>> widths, round(removed_fraction(table, widths), 2)
    ({'0': 8}, 0.5)
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compress.analysis.node_kinds import is_transposed_linear
from compress.analysis.untouched import copy_model
from compress.pruning.latency_backends import Backend, check_backend, runtime_call
from compress.pruning.structured import ChannelGroup

__all__ = ["Timer", "compare_models", "layer_macs_timer", "measure_table", "median_spread"]

Timer = Callable[[Callable[[], object]], float]
"""Seconds of one call of ``fn``. Layer calls are ``functools.partial(layer, x)``; the whole
model's is ``functools.partial(model, *inputs)``: a test timer can return planned numbers."""

_ROUNDS = 5
_MAX_ROUNDS = 20
_SPREAD_BOUND = 0.02
_SAMPLE_S = (2e-3, 20e-3)
_MAX_CANDIDATES = 16


def time_call(fn: Callable[[], object], *, target_s: float = 2e-3) -> float:
    """Seconds per call of ``fn``, looped to last about ``target_s`` (after one warm-up call,
    which also sets the loop count)."""
    with torch.no_grad():
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        loops = max(1, min(1000, int(target_s / once)))
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        return (time.perf_counter() - start) / loops


default_timer: Timer = time_call
"""The timer :func:`measure_table` uses when none is given (tests replace it)."""


def layer_macs_timer(fn: Callable[[], object]) -> float:
    """A planned, load-free "timer": the MACs of the layer call (1e-9 s per MAC); a whole model
    counts as the sum of its conv and linear layers. For docs and tests, never for decisions."""
    assert isinstance(fn, functools.partial)
    module, args = fn.func, fn.args
    assert isinstance(module, nn.Module)
    total = 0.0
    shapes: list[tuple[nn.Module, torch.Size]] = []

    def hook(m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        shapes.append((m, out.shape))

    hooks = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or is_transposed_linear(m)
    ]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    for m, shape in shapes:
        w = m.weight
        assert isinstance(w, torch.Tensor)
        total += math.prod(shape) * (w.numel() // w.shape[_dims(m)[0]])
    return total * 1e-9


def _time_in(backend: Backend, fn: Callable[[], object], *, target_s: float = 2e-3) -> float:
    """``time_call`` of ``fn`` (a PyTorch layer call) rebuilt in ``backend``."""
    assert isinstance(fn, functools.partial)
    return time_call(runtime_call(backend, fn), target_s=target_s)


def candidate_widths(size: int) -> list[int]:
    """Widths tried for a group of ``size`` channels: multiples of a step (8 for groups of 16
    or more, fewer channels for smaller ones; at most 16 candidates) and the full width."""
    step = 1 if size < 16 else 8 * max(1, math.ceil(size / (8 * _MAX_CANDIDATES)))
    return sorted(set(range(step, size, step)) | {size})


def _layers_of(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, dict[str, Any]]:
    """Conv/linear layers the groups touch: the group of their out-channels and the groups of
    their in-channels (with the share of input positions each one holds)."""
    found: dict[str, dict[str, Any]] = {}
    for g in groups:
        for m in g.members:
            if m.param_name != "weight":
                continue
            module = model.get_submodule(m.module_name)
            layer = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
            if not (layer or is_transposed_linear(module)):
                continue
            entry = found.setdefault(m.module_name, {"out": None, "in": []})
            depthwise = getattr(module, "groups", 1) > 1
            out_dim, in_dim = _dims(module)
            if m.dim == out_dim and m.role == "producer":
                entry["out"] = g
                entry["depthwise"] = depthwise
            elif m.dim == in_dim and m.role == "consumer" and not depthwise:
                full = module.get_parameter("weight").shape[in_dim]
                entry["in"].append((g, len(m.index) / full))

    def usable(name: str, entry: dict[str, Any]) -> bool:
        """Grouped convolutions other than depthwise keep their full time (the rest)."""
        m = model.get_submodule(name)
        n_groups = getattr(m, "groups", 1)
        if n_groups == 1:
            return True
        out = entry["out"]
        return out is not None and n_groups == m.in_channels == m.out_channels == out.size

    return {n: e for n, e in found.items() if usable(n, e)}


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


def _dims(module: nn.Module) -> tuple[int, int]:
    """The weight's (output, input) dims: transformers' ``Conv1D`` stores it ``(in, out)``."""
    return (1, 0) if is_transposed_linear(module) else (0, 1)


def _last(module: nn.Module) -> bool:
    """Whether the layer's channels are the last dim of its input (Linear, Conv1D)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _resized(module: nn.Module, out_ch: int, in_ch: int, depthwise: bool) -> nn.Module:
    """A fresh layer like ``module`` with ``out_ch`` outputs and ``in_ch`` inputs."""
    if is_transposed_linear(module):
        return type(module)(out_ch, in_ch)  # Conv1D(nf, nx)
    if isinstance(module, nn.Linear):
        return nn.Linear(in_ch, out_ch, bias=module.bias is not None)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return type(module)(
        in_ch,
        out_ch,
        module.kernel_size,  # type: ignore[arg-type]
        stride=module.stride,  # type: ignore[arg-type]
        padding=module.padding,  # type: ignore[arg-type]
        dilation=module.dilation,  # type: ignore[arg-type]
        groups=out_ch if depthwise else 1,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
    )


def _record(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str]
) -> tuple[dict[str, torch.Size], dict[str, torch.Tensor]]:
    """One eval-mode forward pass of ``model``: each layer's input shape and its output."""
    shapes: dict[str, torch.Size] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name: str, _module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        shapes.setdefault(name, args[0].shape)
        outputs.setdefault(name, out.detach())

    handles = [
        model.get_submodule(n).register_forward_hook(functools.partial(hook, n)) for n in names
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes, outputs


class _Replay(nn.Module):
    """Stands in for a layer: returns the output it gave once, at no cost."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any) -> torch.Tensor:
        return self.output


def _without(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str]
) -> tuple[nn.Module, dict[str, int]]:
    """A copy of ``model`` whose layers ``names`` replay their outputs (timing it measures the
    rest: norms, activations, adds, pooling), and the size of each layer's output per sample."""
    outputs = _record(model, inputs, names)[1]
    rest = copy_model(model).eval()
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(rest.get_submodule(parent), child, _Replay(outputs[name]))
    return rest, {n: out[0].numel() for n, out in outputs.items()}


def _batched(t: torch.Tensor, batch: int | None) -> torch.Tensor:
    if t is None or batch is None or t.dim() == 0:  # None: an optional input left out
        return t
    return torch.randn(batch, *t.shape[1:], dtype=t.dtype, device=t.device)


def median_spread(samples: Sequence[float]) -> float:
    """The spread of the median of ``samples``: its robust standard error, 1.858 times the
    median absolute deviation over the square root of the count (1.4826 MAD estimates the
    standard deviation of normal samples; a median's error is 1.2533 of it over the root)."""
    if len(samples) < 2:
        return 0.0
    mid = statistics.median(samples)
    mad = statistics.median(abs(s - mid) for s in samples)
    return 1.858 * mad / math.sqrt(len(samples))


def _settled(samples: dict[Any, list[float]], bound: float) -> bool:
    """Whether every median's spread is within ``bound`` of itself, or of a fiftieth of the
    largest median (the whole model's: an entry that small moves no choice)."""
    medians = {k: statistics.median(v) for k, v in samples.items()}
    floor = max(medians.values(), default=0.0) / 50
    return all(median_spread(v) <= bound * max(medians[k], floor) for k, v in samples.items())


def _rounds(
    jobs: Sequence[tuple[Any, Callable[[], float]]],
    *,
    rounds: int,
    max_rounds: int,
    bound: float,
    model: nn.Module,
) -> dict[Any, list[float]]:
    """Seconds of every job per round: all jobs take turns in each round, in an order shuffled
    per round (a fixed seed: the same orders in every run) so that a burst of load on a shared
    machine falls on different jobs each round; ``rounds`` rounds, then more until every
    median's spread is within ``bound`` (:func:`_settled`) or ``max_rounds`` are done."""
    samples: dict[Any, list[float]] = {key: [] for key, _ in jobs}
    order = list(range(len(jobs)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for r in range(max(rounds, max_rounds)):
                if r >= rounds and _settled(samples, bound):
                    break
                random.Random(r).shuffle(order)
                for i in order:
                    key, fn = jobs[i]
                    samples[key].append(fn())
    finally:
        model.train(was_training)
    return samples


def compare_models(
    dense: nn.Module,
    small: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    batch_size: int | None = None,
    backend: Backend = "torch",
    rounds: int = _ROUNDS,
    max_rounds: int = _MAX_ROUNDS,
    spread_bound: float = _SPREAD_BOUND,
) -> dict[str, Any]:
    """The measured speed-up of ``small`` (the stripped model) over ``dense`` (the model at
    full width): both timed as :func:`measure_table` times the whole model, taking turns in
    each round, rounds as the table's. The speed-up is the median of the per-round ratios (a
    burst of load that slows one round slows both), with its spread (:func:`median_spread`)::

        {"dense_ms": 12.1, "measured_ms": 3.9, "measured_spread": 0.05, "measured_speedup": 3.1,
         "measured_speedup_spread": 0.04, "measured_rounds": 9}
    """
    inputs = tuple(_batched(t, batch_size) for t in example_inputs)

    def timed(model: nn.Module) -> Callable[[], float]:
        whole = functools.partial(model, *inputs)
        if backend == "torch":
            return functools.partial(default_timer, whole)
        return functools.partial(time_call, runtime_call(backend, whole))

    was_training = small.training
    dense.eval()
    small.eval()
    try:
        jobs = [("dense", timed(dense)), ("small", timed(small))]
        samples = _rounds(
            jobs, rounds=rounds, max_rounds=max_rounds, bound=spread_bound, model=small
        )
    finally:
        small.train(was_training)
    ratios = [d / s for d, s in zip(samples["dense"], samples["small"], strict=True) if s > 0]
    return {
        "dense_ms": statistics.median(samples["dense"]) * 1e3,
        "measured_ms": statistics.median(samples["small"]) * 1e3,
        "measured_spread": median_spread(samples["small"]) * 1e3,
        "measured_speedup": statistics.median(ratios) if ratios else 0.0,
        "measured_speedup_spread": median_spread(ratios),
        "measured_rounds": len(samples["small"]),
    }


def measure_table(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    example_inputs: tuple[torch.Tensor, ...],
    *,
    batch_size: int | None = None,
    timer: Timer | None = None,
    rounds: int = _ROUNDS,
    max_rounds: int = _MAX_ROUNDS,
    spread_bound: float = _SPREAD_BOUND,
    backend: Backend = "torch",
) -> dict[str, Any]:
    """Times each group's layers at the group's candidate widths; returns the table (module
    docstring). Every group's variants take turns within a round, in a shuffled order; values
    are medians of at least ``rounds`` rounds, more until each median's spread
    (:func:`median_spread`, kept beside it as ``spread``) is within ``spread_bound`` of it, at
    most ``max_rounds``. Fresh layers with random weights are timed, the model is not changed.

    ``backend`` names the runtime the calls are timed in (:mod:`latency_backends`); outside
    PyTorch a runtime fuses norms and activations into the layers, so the rest is what the
    whole model takes beyond its layers rather than a model of replayed layers. A ``timer``
    given is handed the PyTorch calls whatever the backend (planned times for tests)."""
    check_backend(backend)
    was_training = model.training
    if timer is not None:
        time_fn = timer
    elif backend == "torch":
        time_fn = default_timer
    else:  # each call rebuilt in the runtime when timed, so that at most one is held at a time
        time_fn = functools.partial(_time_in, backend)
    layers = _layers_of(model, groups)
    inputs = tuple(_batched(t, batch_size) for t in example_inputs)
    # The conv and linear layers no group touches are timed too (at full width only): they are
    # part of the model's time that pruning leaves, not of the rest that shrinks with the groups.
    whole_layers = [
        n
        for n, m in model.named_modules()
        if n and n not in layers and (_is_layer(m) or is_transposed_linear(m))
    ]
    shapes = _record(model, inputs, list(layers) + whole_layers)[0]
    layers = {n: e for n, e in layers.items() if n in shapes}
    whole_layers = [n for n in whole_layers if n in shapes]
    table: dict[str, Any] = {
        "backend": backend,
        "batch_size": next((int(t.shape[0]) for t in inputs if t is not None and t.dim()), None),
        "groups": {g.name: {"size": g.size, "widths": candidate_widths(g.size)} for g in groups},
        "layers": {},
    }

    def call(name: str, out_ch: int | None, in_ch: int | None) -> Callable[[], object]:
        module = model.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        e = layers[name]
        out_ch = weight.shape[_dims(module)[0]] if out_ch is None else out_ch
        full_in = shapes[name][-1] if _last(module) else shapes[name][1]
        in_ch = full_in if in_ch is None else in_ch
        if e.get("depthwise"):
            in_ch = out_ch
        layer = _resized(module, out_ch, in_ch, bool(e.get("depthwise"))).eval()
        shape = list(shapes[name])
        shape[-1 if _last(module) else 1] = in_ch
        x = torch.randn(shape)
        return functools.partial(layer, x)

    # Every layer at full width and at each narrower candidate width of its groups (the full
    # width is timed once per layer: it ends every curve); all take turns in each round.
    jobs: list[tuple[tuple[str, str, int, int], Callable[[], object]]] = []
    for name, e in layers.items():
        jobs.append(((name, "full", 0, 0), call(name, None, None)))
        if e["out"] is not None:
            g = e["out"]
            module = model.get_submodule(name)
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            for i, w in enumerate(table["groups"][g.name]["widths"][:-1]):
                width = max(1, round(weight.shape[_dims(module)[0]] * w / g.size))
                jobs.append(((name, "out", 0, i), call(name, width, None)))
        full_in = shapes[name][-1 if _last(model.get_submodule(name)) else 1]
        for j, (g, share) in enumerate(e["in"]):
            for i, w in enumerate(table["groups"][g.name]["widths"][:-1]):
                removed = round(full_in * share * (1 - w / g.size))
                jobs.append(((name, "in", j, i), call(name, None, max(1, full_in - removed))))
    for name in whole_layers:
        layer = copy_model(model.get_submodule(name)).eval()
        jobs.append(((name, "full", 0, 0), functools.partial(layer, torch.randn(shapes[name]))))
    whole = functools.partial(model, *inputs)
    replayed, outputs = _without(model, inputs, list(layers) + whole_layers)
    # the activations the rest (norms, activations, adds) works on, per sample: every layer's
    table["volume_total"] = sum(outputs.values())
    rest = functools.partial(replayed, *inputs)
    if timer is None:  # samples as long as one call of the whole model (module docstring)
        with torch.no_grad():
            model.eval()
            sample_s = min(max(time_call(whole, target_s=0.0), _SAMPLE_S[0]), _SAMPLE_S[1])
            model.train(was_training)
        table["sample_ms"] = sample_s * 1e3
        if backend != "torch":
            time_fn = functools.partial(_time_in, backend, target_s=sample_s)
        elif default_timer is time_call:
            time_fn = functools.partial(time_call, target_s=sample_s)
    for g in groups:  # the activation each group's producers write: the rest shrinks with it
        table["groups"][g.name]["volume"] = sum(
            outputs[n] for n, e in layers.items() if e["out"] is g
        )
    time_whole, time_rest = functools.partial(time_fn, whole), functools.partial(time_fn, rest)
    if backend != "torch" and timer is None:  # converted once; the rest follows from it below
        time_whole = functools.partial(time_call, runtime_call(backend, whole))
        time_rest = functools.partial(float, 0)
    all_jobs = [(("model", "", 0, 0), time_whole), (("rest", "", 0, 0), time_rest)]
    all_jobs += [(key, functools.partial(time_fn, fn)) for key, fn in jobs]
    samples = _rounds(
        all_jobs, rounds=rounds, max_rounds=max_rounds, bound=spread_bound, model=model
    )
    ms = {key: statistics.median(v) * 1e3 for key, v in samples.items()}
    spread = {key: median_spread(v) * 1e3 for key, v in samples.items()}
    table["rounds"] = len(samples[("model", "", 0, 0)])
    table["spread_bound"] = spread_bound
    table["model_ms"], table["model_spread"] = ms[("model", "", 0, 0)], spread[("model", "", 0, 0)]
    table["rest_ms"], table["rest_spread"] = ms[("rest", "", 0, 0)], spread[("rest", "", 0, 0)]

    def curve(name: str, kind: str, j: int, group: ChannelGroup) -> dict[str, Any]:
        n = len(table["groups"][group.name]["widths"])
        keys = [(name, kind, j, i) for i in range(n - 1)] + [(name, "full", 0, 0)]
        times, spreads = [ms[k] for k in keys], [spread[k] for k in keys]
        # A narrower layer is never taken to be slower than a wider one: on a loaded machine a
        # stalled sample would otherwise make a width look worse than the full layer.
        for i in range(n - 2, -1, -1):
            if times[i] > times[i + 1]:
                times[i], spreads[i] = times[i + 1], max(spreads[i], spreads[i + 1])
        return {"group": group.name, "ms": times, "spread": spreads}

    for name, e in layers.items():
        table["layers"][name] = {
            "ms": ms[(name, "full", 0, 0)],
            "spread": spread[(name, "full", 0, 0)],
            "out": None if e["out"] is None else curve(name, "out", 0, e["out"]),
            "in": [curve(name, "in", j, g) for j, (g, _) in enumerate(e["in"])],
        }
    for name in whole_layers:
        key = (name, "full", 0, 0)
        table["layers"][name] = {"ms": ms[key], "spread": spread[key], "out": None, "in": []}
    if backend != "torch" and timer is None:
        full = sum(e["ms"] for e in table["layers"].values())
        table["rest_ms"] = max(0.0, table["model_ms"] - full)
        table["rest_spread"] = table["model_spread"]
    return table
