"""Effective sparsity: the fraction of weights that are zero *or* cut off from the input or output.

Vysogorets & Kempe, "Connectivity Matters: Neural Network Pruning Through the Lens of Effective
Sparsity" (arXiv 2107.02306). A nonzero weight still does nothing when no path of nonzero weights
leads from the network input to it, or from it to the output: zeroing a row of one Linear layer
silently removes the matching column of the next one. At high sparsity the effective sparsity can
be far above the direct one, so comparing pruning methods by direct sparsity alone misleads.

The model is read as a graph of *units* (Linear features, conv channels) with an edge wherever a
weight is nonzero (for conv: any element of the ``(out, in)`` kernel). A weight ``u -> v`` is
active iff it is nonzero, ``u`` is reachable from the input and ``v`` reaches the output. That is
the fixpoint of the iterative rule "a unit with no active incoming connection deactivates its
outgoing ones, a unit with no active outgoing connection deactivates its incoming ones": on an
acyclic graph one forward sweep (reachable from the input) and one backward sweep (reaches the
output) compute it exactly.

Choices, stated because the paper counts weights and never biases:

- A unit with no active incoming weight is dead even if it has a bias, and a BatchNorm ``beta``
  does not revive a dead channel: both make it output a constant, which carries no information
  from the input. Biases and BatchNorm parameters are never counted.
- Activations, pooling, BatchNorm, dropout and other elementwise ops keep channels apart; a
  residual add (or any elementwise op of two tensors) keeps a channel alive if any operand's
  channel is alive; ``torch.cat`` on dim 1 places channels at offsets; flatten maps conv channel
  ``c`` to the ``H*W`` consecutive features ``c*H*W ... (c+1)*H*W - 1``.
- LayerNorm, GroupNorm and softmax mix channels: any live input makes every output live.
- Anything else is not understood: its outputs count as reachable from the input and its inputs
  as reaching the output (effective == direct around it), with one warning naming the op.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     net[0].weight[0] = 0.0  # hidden unit 0 is cut off from the input ...
    >>> active_weights(net)["2.weight"].tolist()  # ... so its outgoing weight is idle
    [[False, True]]

:func:`compress.analysis.effective_report.sparsity_report` turns these masks into direct and
effective sparsity per layer.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from compress import masks
from compress.analysis.node_kinds import (
    classify,
    is_layer,
    is_prunable,
    is_transposed_linear,
    op_name,
    shape_of,
)
from compress.analysis.untouched import untouched

Vec = torch.Tensor | None
"""Liveness of a tensor's channels: a 1-D bool tensor, or None for "all alive, width unknown"."""


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<module name>.weight": module}`` for every Linear and Conv1d/2d/3d, in model order."""
    return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if is_prunable(m)}


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the forward pass sees it: ``param * mask`` when masked, else the parameter."""
    if "weight" in masks.masked_names(module):
        return masks.effective(module, "weight")
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


@dataclass(frozen=True)
class _Layer:
    """The unit-level view of one layer: which (out, in) connections exist."""

    nonzero: torch.Tensor  # weight != 0, (out, in, ...)
    conn: torch.Tensor  # (out, in / groups): any nonzero kernel element
    groups: int
    transposed: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> _Layer:
        nonzero = layer_weight(module) != 0
        if is_transposed_linear(module):
            nonzero = nonzero.T
        conn = nonzero.flatten(2).any(2) if nonzero.dim() > 2 else nonzero
        return cls(nonzero, conn, getattr(module, "groups", 1), is_transposed_linear(module))

    @property
    def in_width(self) -> int:
        return self.conn.shape[1] * self.groups

    @property
    def out_width(self) -> int:
        return self.conn.shape[0]

    def per_weight_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input liveness laid out as ``conn``: row ``o`` holds the inputs of ``o``'s group."""
        return x.view(self.groups, -1).repeat_interleave(self.out_width // self.groups, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output unit ``o`` is reachable iff some ``conn[o, i]`` has a reachable input ``i``."""
        return (self.conn & self.per_weight_input(x)).any(1)

    def backward(self, y: torch.Tensor) -> torch.Tensor:
        """Input unit ``i`` reaches the output iff some ``conn[o, i]`` has ``o`` reaching it."""
        edges = (self.conn & y[:, None]).view(self.groups, -1, self.conn.shape[1])
        return edges.any(1).flatten()

    def active(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per weight, in the layer's own layout (``(in, out)`` for a transposed Linear)."""
        edges = self.conn & y[:, None] & self.per_weight_input(x)
        out = self.nonzero & edges.view(*edges.shape, *[1] * (self.nonzero.dim() - 2))
        return out.T if self.transposed else out


def _align(vec: Vec, width: int) -> torch.Tensor:
    """``vec`` as exactly ``width`` entries.

    A shorter vector whose length divides ``width`` is spread over consecutive blocks (a channel
    broadcast, or conv channels flattened into Linear features); a longer one is folded back with
    ``any`` (the backward view of the same). An empty vector means "nothing alive".
    """
    if vec is None:
        return torch.ones(width, dtype=torch.bool)
    n = vec.numel()
    if n == width:
        return vec
    if n == 0:
        return torch.zeros(width, dtype=torch.bool)
    if width % n == 0:
        return vec.repeat_interleave(width // n)
    if n % width == 0:
        return vec.view(width, -1).any(1)
    return torch.ones(width, dtype=torch.bool)  # unrelated shapes: assume connected


def _union(vecs: list[Vec], width: int | None) -> Vec:
    """Channel-wise OR; unknown widths or mismatched lengths give None (all alive)."""
    if any(v is None for v in vecs):
        return None
    tensors = [v for v in vecs if v is not None and v.numel()]
    if not tensors:
        return torch.zeros(width or 0, dtype=torch.bool)
    if width is None:
        width = max(t.numel() for t in tensors)
        if any(width % t.numel() for t in tensors):
            return None
    out = torch.zeros(width, dtype=torch.bool)
    for t in tensors:
        out |= _align(t, width)
    return out


def _width(node: fx.Node, fwd: dict[fx.Node, Vec]) -> int | None:
    vec = fwd.get(node)
    if vec is not None:
        return vec.numel()
    shape = shape_of(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


class _Tracer(fx.Tracer):
    """Stops at masked modules and at custom layers (parameters of their own, none below them,
    as timm's norm-act modules and Linear subclasses): traced through, their ``forward`` would
    read the masked weight, which would become a constant of the graph."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name) or masks.masked_names(m):
            return True
        return bool(m._parameters) and not any(c._parameters for c in m.modules() if c is not m)


def _trace(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    graph_module = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    if example_inputs is None:
        return graph_module
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    # Channel counts do not depend on the batch: one sample is enough and much cheaper.
    inputs = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no BatchNorm running-stat updates from our probe
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*inputs)
    except Exception as error:  # shapes are optional: widths are then inferred lazily
        warnings.warn(
            f"effective sparsity: shape propagation failed ({error}); continuing without shapes",
            stacklevel=3,
        )
    finally:
        for module, mode in modes.items():
            module.training = mode
    return graph_module


def active_weights(
    model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Per prunable layer, a bool mask of the weights that lie on some input-to-output path.

    Keys are ``"<module name>.weight"`` for every Linear and Conv1d/2d/3d. ``mask[w]`` is True iff
    weight ``w`` is nonzero (after masking), its input unit is reachable from the network input
    and its output unit reaches the output; see the module docstring for the rules.
    ``example_inputs`` lets a flatten know each channel's ``H*W``; without it that size is
    inferred from the next Linear's ``in_features``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     net[2].weight[0, 1] = 0.0  # hidden unit 1 no longer reaches the output
        >>> active_weights(net)["0.weight"].tolist()
        [[True, True], [False, False]]
    """
    layers = prunable_layers(model)
    direct = {name: layer_weight(m) != 0 for name, m in layers.items()}
    if is_prunable(model):  # a single layer: every nonzero weight joins input and output
        return direct
    with untouched(model):
        try:
            graph_module = _trace(model, example_inputs)
        except Exception as error:  # the parts that trace, the direct masks elsewhere
            active, parts = _by_parts(model, example_inputs, direct)
            traced = (
                f"traced {len(parts)} parts alone ({', '.join(parts[:3])}"
                + (", ..." if len(parts) > 3 else "")
                + "), every nonzero weight elsewhere counted as active"
                if parts
                else "counting every nonzero weight as active"
            )
            warnings.warn(
                f"effective sparsity: torch.fx could not trace {type(model).__name__} ({error}); "
                + traced,
                stacklevel=2,
            )
            return active
        return _sweep(graph_module, {m: n for n, m in layers.items()}, direct)


def _by_parts(
    model: nn.Module, example_inputs: Any, direct: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """When the model does not trace as a whole (Hugging Face models, whose ``forward`` takes
    ``**kwargs``): the largest submodules with two or more layers that do trace, each on the
    positional tensors it received in one forward pass of ``example_inputs`` and read as if
    its input and output were the network's. A weight found idle inside a part is idle in the
    model; paths between parts are not followed (counted as active)."""
    active = dict(direct)
    if example_inputs is None:
        return active, []
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    seen: dict[str, tuple[Any, ...]] = {}

    def keep(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not kwargs and args and all(isinstance(a, torch.Tensor) for a in args):
            seen.setdefault(name, args)

    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if name and sum(is_prunable(c) for c in m.modules()) >= 2
    ]
    hooks = [
        m.register_forward_pre_hook(functools.partial(keep, name), with_kwargs=True)
        for name, m in candidates
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception:  # noqa: BLE001 - no forward pass, no parts
        return active, []
    finally:
        for hook in hooks:
            hook.remove()
    parts: list[str] = []
    for name, part in candidates:
        if name not in seen or any(name.startswith(p + ".") for p in parts):
            continue
        own = prunable_layers(part)
        mine = {n: direct[f"{name}.{n}"] for n in own}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph_module = _trace(part, seen[name])
                found = _sweep(graph_module, {m: n for n, m in own.items()}, mine)
        except Exception:  # noqa: BLE001 - this part does not trace either: its children may
            continue
        active.update({f"{name}.{n}": v for n, v in found.items()})
        parts.append(name)
    return active, parts


def _sweep(
    graph_module: fx.GraphModule,
    names: dict[nn.Module, str],
    direct: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Forward then backward reachability over the traced graph; returns per-weight activity."""
    modules = dict(graph_module.named_modules())
    nodes = list(graph_module.graph.nodes)
    layers = {
        str(n.target): _Layer.of(modules[str(n.target)]) for n in nodes if is_layer(n, modules)
    }
    kinds: dict[fx.Node, str] = {}
    fwd: dict[fx.Node, Vec] = {}  # only nodes that carry information from the input
    cat_widths: dict[fx.Node, list[int]] = {}
    lazy: set[fx.Node] = set()  # flattened without shapes: one entry per channel, not feature
    unknown: list[str] = []
    for node in nodes:
        if node.op == "placeholder":
            fwd[node] = None
            continue
        inputs = [a for a in node.all_input_nodes if a in fwd]
        if node.op in ("output", "get_attr") or not inputs:
            continue
        kind = classify(node, modules)
        if kind == "cat" and (lazy.intersection(inputs) or not _plan_cat(node, fwd, cat_widths)):
            kind = "unknown"
        if (kind == "flatten" and shape_of(node) is None) or (
            kind in ("pass", "mix") and lazy.intersection(inputs)
        ):
            lazy.add(node)
        kinds[node] = kind
        if kind == "noinfo":
            continue
        if kind == "unknown":
            unknown.append(op_name(node, modules))
        fwd[node] = _forward(node, kind, inputs, fwd, layers, cat_widths)

    bwd_in: dict[fx.Node, list[Vec]] = {node: [] for node in fwd}
    active = {name: torch.zeros_like(mask) for name, mask in direct.items()}
    called: set[str] = set()
    for node in reversed(nodes):
        if node.op == "output":
            for arg in node.all_input_nodes:
                if arg in fwd:
                    bwd_in[arg].append(None)
            continue
        if node not in kinds or kinds[node] == "noinfo":
            continue
        kind, inputs = kinds[node], [a for a in node.all_input_nodes if a in fwd]
        out = _union(bwd_in[node], _width(node, fwd))
        if kind == "layer":
            module, layer = modules[str(node.target)], layers[str(node.target)]
            x, y = _align(fwd[inputs[0]], layer.in_width), _align(out, layer.out_width)
            name = names[module]
            active[name] |= layer.active(x, y)
            called.add(name)
            bwd_in[inputs[0]].append(layer.backward(y))
        elif kind == "cat":
            pieces = _align(out, sum(cat_widths[node])).split(cat_widths[node])
            for arg, piece in zip(node.args[0], pieces, strict=True):  # type: ignore[arg-type]
                if arg in fwd:
                    bwd_in[arg].append(piece)
        elif kind == "mix":
            alive = out is None or bool(out.any())
            for arg in inputs:
                bwd_in[arg].append(None if alive else torch.zeros(0, dtype=torch.bool))
        else:  # pass, flatten, unknown: the flatten fold happens in _align at the input's width
            for arg in inputs:
                bwd_in[arg].append(None if kind == "unknown" else out)

    uncalled = [name for name in direct if name not in called]
    for name in uncalled:
        active[name] = direct[name]
    if unknown or uncalled:
        warnings.warn(_fallback_message(unknown, uncalled), stacklevel=3)
    return active


def _plan_cat(node: fx.Node, fwd: dict[fx.Node, Vec], cat_widths: dict[fx.Node, list[int]]) -> bool:
    """Records the channel offsets of a channel concat; False when a width is unknown."""
    widths = []
    for arg in node.args[0]:  # type: ignore[union-attr]
        width = _width(arg, fwd) if isinstance(arg, fx.Node) else None
        if width is None:
            return False
        widths.append(width)
    cat_widths[node] = widths
    return True


def _forward(
    node: fx.Node,
    kind: str,
    inputs: list[fx.Node],
    fwd: dict[fx.Node, Vec],
    layers: dict[str, _Layer],
    cat_widths: dict[fx.Node, list[int]],
) -> Vec:
    """Which channels of ``node``'s output carry information from the network input."""
    if kind == "layer":
        layer = layers[str(node.target)]
        return layer.forward(_align(fwd[inputs[0]], layer.in_width))
    if kind == "pass":
        return _union([fwd[a] for a in inputs], _width(node, {}))
    if kind == "mix":
        vec = _union([fwd[a] for a in inputs], None)
        return None if vec is None else vec.any().expand(vec.numel()).clone()
    if kind == "cat":
        parts = node.args[0]
        return torch.cat(
            [
                _align(fwd[a], w) if a in fwd else torch.zeros(w, dtype=torch.bool)
                for a, w in zip(parts, cat_widths[node], strict=True)  # type: ignore[arg-type]
            ]
        )
    if kind == "flatten":
        vec, shape = fwd[inputs[0]], shape_of(node)
        if vec is None or shape is None or len(shape) != 2 or shape[1] % vec.numel():
            return vec  # spread lazily by _align at the consumer
        return vec.repeat_interleave(shape[1] // vec.numel())
    return None  # unknown: assume every channel carries input information


def _fallback_message(unknown: list[str], uncalled: list[str]) -> str:
    parts = []
    if unknown:
        ops = ", ".join(dict.fromkeys(unknown))
        parts.append(f"ops not understood: {ops} (treated as fully connected)")
    if uncalled:
        parts.append(
            f"layers not called as modules in the traced graph: {', '.join(uncalled)} "
            "(every nonzero weight counted as active)"
        )
    return "effective sparsity: " + "; ".join(parts)


__all__ = ["active_weights", "layer_weight", "prunable_layers"]
