"""Structured (filter/channel) pruning machinery: coupled channel groups, masks, shrinking.

Torch-Pruning's ``DependencyGraph`` finds which output channels are coupled (residual adds,
concat, split, depthwise convs, norms, Linear after flatten). This module turns each of its
groups into a plain :class:`ChannelGroup` that names parameters by module name, so a pruning
algorithm can score channels, write its choice into masks during training, and finally call
:func:`shrink` to remove the channels physically. The masked model computes exactly what the
shrunk model computes: a pruned channel is zero at every producer (weights, bias, norm affine),
so consumers see exact zeros, which is what removing the channel gives.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> [g.name for g in build_groups(model, x, prune_first_conv=True)]
    ['0']
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress import masks
from compress.errors import CompressError

__all__ = [
    "ChannelGroup",
    "Member",
    "apply_channel_mask",
    "build_groups",
    "channel_norms",
    "count_macs_params",
    "group_weights",
    "load_pruned",
    "pruning_plan",
    "round_keep",
    "save_pruned",
    "shrink",
    "shrunk_numel",
]

Role = Literal["producer", "norm", "consumer", "other"]
Inputs = torch.Tensor | Sequence[torch.Tensor]

FORMAT = "compress.pruned"
VERSION = 1
OWNER = "filter_pruning"
"""The mask owner of channel masks: a sparsity algorithm on the same weight keeps its own."""

Layer = nn.modules.conv._ConvNd | nn.Linear
"""The layers a group can be built around; ``prunable`` of :func:`build_groups` picks among them."""

_OPS = tp.ops.OPTYPE
# Graph nodes that only route channels (no parameters); their items carry nothing to map.
_ROUTING = {
    _OPS.CONCAT,
    _OPS.SPLIT,
    _OPS.ELEMENTWISE,
    _OPS.RESHAPE,
    _OPS.UNBIND,
    _OPS.EXPAND,
    _OPS.SLICE,
}
# Why a group is left out instead of mapped: the masked model would not equal the shrunk one.
_UNSUPPORTED = {
    _OPS.MHA: "nn.MultiheadAttention: removing embedding channels re-partitions the heads",
    _OPS.LN: "LayerNorm: its statistics include the zeroed channels, so masking is not exact",
    _OPS.GN: "GroupNorm: its statistics include the zeroed channels, so masking is not exact",
    _OPS.LSTM: "LSTM: gate-coupled channels are not mapped",
    _OPS.CUSTOMIZED: "customized layer: no known parameter layout",
}


@dataclass(frozen=True, eq=False)
class Member:
    """One parameter slice that belongs to a channel group.

    ``index[j]`` is a position along ``dim`` of ``module_name.param_name`` and ``channel[j]`` the
    group channel it belongs to. For the common one-to-one case ``channel == arange(size)``, so
    ``index[i]`` is the position of group channel ``i``. A channel may own several positions
    (Linear after flatten: one per spatial element) and a member may cover only some channels
    (a consumer of one half of a split).

    ``role`` says how the slice relates to the channel: ``producer`` (conv/linear out-dim weight
    and bias, depthwise conv, unwrapped parameters), ``norm`` (norm affine weight and bias),
    ``consumer`` (in-dim weight of the next layer) or ``other`` (PReLU slopes).
    """

    module_name: str
    param_name: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: Role


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """A set of coupled channels that are kept or removed together.

    ``name`` is the root module's name, a stable id across fresh instances of the same class.
    ``mask_norms`` is False when the group was built with ``prune_batch_norms=False``.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    mask_norms: bool = True

    @property
    def root(self) -> Member:
        """The root layer's out-dim weight: its positions are the ones Torch-Pruning prunes."""
        return self.members[0]


class _Skip(Exception):
    """A group that is left out on purpose; ``warn`` says whether the user should hear of it."""

    def __init__(self, reason: str, *, warn: bool = True) -> None:
        super().__init__(reason)
        self.warn = warn


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _trace(model: nn.Module, example_inputs: Inputs) -> tp.DependencyGraph:
    """Builds Torch-Pruning's graph; the caller passes a copy because tracing calls ``eval()``."""
    inputs = _as_tuple(example_inputs)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's own notices; we report what matters
        return tp.DependencyGraph().build_dependency(
            model, inputs, forward_fn=lambda m, x: m(*x), verbose=False
        )


def _bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy without masks: mask products in the forward pass would look like extra ops."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        masks.remove(module)
    return clone


def _is_named(name: str, names: Collection[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


def _input_convs(dg: tp.DependencyGraph) -> set[nn.Module]:
    """Convs with no parametric layer upstream: they see the network input (NNCF's first conv)."""
    parametric = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.MultiheadAttention)
    found: set[nn.Module] = set()
    for module, node in dg.module2node.items():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        stack, seen, upstream = list(node.inputs), set(), False
        while stack and not upstream:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            upstream = isinstance(n.module, parametric)
            stack.extend(n.inputs)
        if not upstream:
            found.add(module)
    return found


class _Classes:
    """Union-find over root channels; grouped convs tie channels across their conv groups."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def labels(self) -> tuple[torch.Tensor, int]:
        roots = sorted({self.find(i) for i in range(len(self.parent))})
        rank = {r: k for k, r in enumerate(roots)}
        return torch.tensor([rank[self.find(i)] for i in range(len(self.parent))]), len(roots)


def _tie_grouped_conv(
    classes: _Classes, conv: nn.modules.conv._ConvNd, idxs: list[int], roots: list[int], n: int
) -> None:
    """A grouped conv keeps or drops the same relative channel in every conv group.

    That is the only layout a smaller grouped conv can hold (and what Torch-Pruning's
    in-channel pruning assumes), so channels that sit at the same offset are tied into one.
    """
    if sorted(idxs) != list(range(n)):
        raise _Skip(f"grouped conv {conv} shares its channels with another group")
    period = n // conv.groups
    first: dict[int, int] = {}
    for idx, root in zip(idxs, roots, strict=True):
        first.setdefault(idx % period, root)
        classes.union(first[idx % period], root)


def _item_members(
    name: str,
    module: nn.Module | nn.Parameter,
    node_type: tp.ops.OPTYPE,
    is_out: bool,
    dg: tp.DependencyGraph,
) -> list[tuple[str, str, int, Role]]:
    """(module name, param name, dim, role) for every parameter one Torch-Pruning item prunes.

    ``module`` is the node's module, or the parameter itself for an unwrapped parameter.
    """
    if isinstance(module, nn.Parameter):  # node type PARAMETER
        full = dg._param_to_name[module]
        owner, _, param = full.rpartition(".")
        return [(owner, param, dg.module2node[module].pruning_dim % module.dim(), "producer")]
    if node_type in (_OPS.CONV, _OPS.DEPTHWISE_CONV, _OPS.LINEAR):
        transposed = getattr(module, "transposed", False)
        if transposed and isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            raise _Skip(f"grouped transposed conv {name!r} is not mapped")
        if is_out or node_type == _OPS.DEPTHWISE_CONV:
            dims: list[tuple[str, str, int, Role]] = [
                (name, "weight", 1 if transposed else 0, "producer")
            ]
            if module.bias is not None:
                dims.append((name, "bias", 0, "producer"))
            return dims
        return [(name, "weight", 0 if transposed else 1, "consumer")]
    if node_type in (_OPS.BN, _OPS.IN):
        return [(name, p, 0, "norm") for p in ("weight", "bias") if getattr(module, p) is not None]
    if isinstance(module, nn.PReLU):  # node type PRELU
        return [(name, "weight", 0, "other")] if module.num_parameters > 1 else []
    if node_type == _OPS.EMBED:
        return [(name, "weight", 1, "producer")]
    raise _Skip(_UNSUPPORTED.get(node_type, f"{node_type.name} layer {name!r} is not mapped"))


def _map_group(dg: tp.DependencyGraph, tp_group: tp.dependency.Group) -> tuple[list[Member], int]:
    """Maps one Torch-Pruning group to Members; raises _Skip when that is not possible."""
    root_size = len(tp_group[0].idxs)
    classes = _Classes(root_size)
    raw: list[tuple[str, str, int, Role, list[int], list[int]]] = []
    for item in tp_group.items:
        node = item.dep.target
        module, idxs, roots = node.module, list(item.idxs), list(item.root_idxs)
        if node.type == _OPS.OUTPUT:
            raise _Skip("its channels are network outputs", warn=False)
        if node.type in _ROUTING:
            if not node.outputs:
                raise _Skip("its channels are network outputs", warn=False)
            continue
        if any(r < 0 or r >= root_size for r in roots):
            raise _Skip(f"root index outside the root layer at {node.name}")
        name = dg._module2name.get(module, str(node.name))
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        consumer = node.type in (_OPS.CONV, _OPS.LINEAR) and not is_out
        if not consumer and not node.outputs:
            raise _Skip("its channels are network outputs", warn=False)
        if node.type == _OPS.CONV and module.groups > 1:
            n = module.out_channels if is_out else module.in_channels
            _tie_grouped_conv(classes, module, idxs, roots, n)
            if not is_out:  # the weight's in-dim holds one conv group's worth of channels
                idxs = [i % (n // module.groups) for i in idxs]
        for mod_name, param, dim, role in _item_members(name, module, node.type, is_out, dg):
            raw.append((mod_name, param, dim, role, idxs, roots))
    labels, size = classes.labels()
    members: list[Member] = []
    for mod_name, param, dim, role, idxs, roots in raw:
        channel = labels[torch.tensor(roots, dtype=torch.long)]
        members.append(Member(mod_name, param, dim, torch.tensor(idxs), channel, role))
    return members, size


def _producer_modules(model: nn.Module, members: Sequence[Member]) -> list[tuple[str, nn.Module]]:
    names = {m.module_name for m in members if m.role in ("producer", "norm")}
    return [(n, model.get_submodule(n)) for n in sorted(names) if n]


def _check_flags(
    model: nn.Module,
    members: Sequence[Member],
    *,
    ignored: Collection[str],
    input_convs: set[nn.Module],
    prune_first_conv: bool,
    prune_downsample_convs: bool,
    prunable: tuple[type[Layer], ...],
) -> None:
    """Raises a silent _Skip when the user's options exclude the group (NNCF semantics)."""
    for name, module in _producer_modules(model, members):
        if _is_named(name, ignored):
            raise _Skip(f"{name!r} is ignored", warn=False)
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            if not isinstance(module, prunable):
                raise _Skip(f"{name!r} is not a prunable type", warn=False)
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        if not prune_first_conv and module in input_convs:
            raise _Skip(f"{name!r} is the first conv", warn=False)
        depthwise = module.groups == module.out_channels and module.groups > 1
        if not prune_downsample_convs and not depthwise and max(module.stride) > 1:
            raise _Skip(f"{name!r} is a downsample conv", warn=False)


def build_groups(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    ignored: Collection[str] = (),
    prune_first_conv: bool = False,
    prune_downsample_convs: bool = False,
    prune_batch_norms: bool = True,
    prunable: tuple[type[Layer], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
    validate: bool = True,
) -> list[ChannelGroup]:
    """One :class:`ChannelGroup` per set of coupled output channels that may be pruned.

    Groups whose channels reach the network output are never returned. ``ignored`` names
    modules (a container name covers its children) whose output channels stay. With
    ``prune_first_conv=False`` convs that consume the network input keep their channels; with
    ``prune_downsample_convs=False`` convs with stride > 1 do (depthwise convs only carry
    channels and do not count). ``prune_batch_norms=False`` leaves norm affines unmasked, as in
    NNCF: a pruned channel is then the constant ``beta - gamma * mean / std`` after the norm
    during training, and the shrunk model, which has no such channel, differs by it.

    A group Torch-Pruning cannot give, or that cannot be mapped exactly (see ``_UNSUPPORTED``),
    is left out, and one warning lists all such groups with the reason. With ``validate`` the
    groups are also checked numerically: a random half of every group's channels is masked in
    one copy and removed in another, and a group whose removal crashes or changes the output
    (hand-written attention whose heads come from ``view``, say) is left out the same way.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> [(g.name, g.size) for g in build_groups(m, x, prune_first_conv=True)]
        [('0', 8)]
    """
    clone = _bare_copy(model)
    try:
        dg = _trace(clone, example_inputs)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "nothing to prune"
        warnings.warn(
            f"Torch-Pruning could not trace the model, no channel groups: {err}", stacklevel=2
        )
        return []
    input_convs = _input_convs(dg)
    visited: set[nn.Module] = set()
    groups: list[ChannelGroup] = []
    claimed: set[tuple[str, str, int, int]] = set()
    problems: list[str] = []
    for name, module in clone.named_modules():
        if module in visited or module not in dg.module2node or not isinstance(module, prunable):
            continue
        if _is_named(name, ignored):
            continue
        try:
            tp_group = dg.get_pruning_group(
                module,
                dg.get_pruner_of_module(module).prune_out_channels,
                list(range(_width(module))),
            )
            visited.update(
                item.dep.target.module
                for item in tp_group.items
                if dg.is_out_channel_pruning_fn(item.dep.handler)
            )
            members, size = _map_group(dg, tp_group)
            _check_flags(
                clone,
                members,
                ignored=ignored,
                input_convs=input_convs,
                prune_first_conv=prune_first_conv,
                prune_downsample_convs=prune_downsample_convs,
                prunable=prunable,
            )
            _claim(claimed, members)
        except _Skip as skip:
            if skip.warn:
                problems.append(f"group {name!r}: {skip}")
            continue
        except Exception as err:  # noqa: BLE001 - Torch-Pruning failures must not crash training
            problems.append(f"group {name!r}: Torch-Pruning failed ({type(err).__name__}: {err})")
            continue
        if size > 1:
            groups.append(ChannelGroup(name, size, tuple(members), prune_batch_norms))
    if validate:
        groups = _exact_groups(clone, groups, example_inputs, problems)
    if problems:
        warnings.warn(
            "These channel groups are left unpruned: " + "; ".join(problems), stacklevel=2
        )
    return groups


def _random_keep(groups: Sequence[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    """About half of each group's channels, at least one, drawn from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        k = torch.rand(group.size, generator=gen) < 0.5
        k[torch.randint(group.size, (1,), generator=gen)] = True
        keep[group.name] = k
    return keep


def _matches(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
) -> str | None:
    """None if masking and removing ``keep`` give the same output, else what went wrong."""
    masked = copy.deepcopy(model).eval()
    for group in groups:  # norms masked whatever the option: this checks the mapping itself
        apply_channel_mask(masked, replace(group, mask_norms=True), keep[group.name])
    try:
        small = shrink(masked, groups, keep, example_inputs=inputs).eval()
        with torch.no_grad():
            want, got = masked(*inputs), small(*inputs)
            error = _max_rel_error(want, got)
    except Exception as err:  # noqa: BLE001 - a crash is one more way not to match
        return f"the shrunk model fails ({type(err).__name__}: {err})"
    return None if error <= 1e-4 else f"the shrunk model's output differs by {error:.2g}"


def _max_rel_error(want: object, got: object) -> float:
    pairs = zip(_leaves(want), _leaves(got), strict=True)
    return max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in pairs)


def _leaves(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.float()]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _exact_groups(
    model: nn.Module, groups: list[ChannelGroup], example_inputs: Inputs, problems: list[str]
) -> list[ChannelGroup]:
    """The groups whose masked model equals their shrunk model; one check, then one per group
    only when the joint check fails."""
    inputs = _as_tuple(example_inputs)
    keep = _random_keep(groups)
    if not groups or _matches(model, groups, keep, inputs) is None:
        return groups
    exact = []
    for group in groups:
        problem = _matches(model, [group], keep, inputs)
        if problem is None:
            exact.append(group)
        else:
            problems.append(f"group {group.name!r}: {problem}")
    return exact


def _width(module: Layer) -> int:
    return (
        module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
    )


def _claim(claimed: set[tuple[str, str, int, int]], members: Sequence[Member]) -> None:
    """Output-side slices belong to one group only, else two groups would fight over a mask."""
    keys = {
        (m.module_name, m.param_name, m.dim, int(i))
        for m in members
        if m.role in ("producer", "norm")
        for i in m.index
    }
    if keys & claimed:
        raise _Skip("its output channels overlap another group")
    claimed.update(keys)


def group_weights(
    model: nn.Module, group: ChannelGroup, *, roles: Sequence[Role] = ("producer", "norm")
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, channel) per member with a role in ``roles``: ``rows[j]`` is the flattened slice at
    ``index[j]`` and ``channel[j]`` its group channel, ready for ``index_add_``.

    Raw parameter values (not masked), so that a pruned channel can earn its way back.

    Example:
        >>> scores = torch.zeros(group.size)  # doctest: +SKIP
        >>> for rows, ch in group_weights(model, group):  # doctest: +SKIP
        ...     scores.index_add_(0, ch, rows.abs().sum(1))
    """
    out = []
    for member in group.members:
        if member.role not in roles:
            continue
        param = model.get_submodule(member.module_name)._parameters[member.param_name]
        assert param is not None  # a member names a parameter that is set
        rows = param.detach().index_select(member.dim, member.index).movedim(member.dim, 0)
        out.append((rows.reshape(len(member.index), -1), member.channel))
    return out


def channel_norms(model: nn.Module, group: ChannelGroup, *, p: float = 1.0) -> torch.Tensor:
    """Per-channel Lp norm (to the p) of the producers' weights: the classic filter criterion."""
    scores = torch.zeros(group.size)
    for rows, channel in group_weights(model, group, roles=("producer",)):
        scores.index_add_(0, channel, rows.float().abs().pow(p).sum(1))
    return scores


def _check_keep(group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.shape != (group.size,):
        raise CompressError(
            f"group {group.name!r}: keep has shape {tuple(keep.shape)}, expected ({group.size},)"
        )
    if not keep.any():
        raise CompressError(
            f"group {group.name!r}: at least one channel must remain, keep is all False"
        )
    return keep


def apply_channel_mask(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Masks every output-side slice of the group: 1 where ``keep``, 0 where pruned.

    Kept slices are set back to 1, so calling this again with a new choice restores channels.
    Norm affines are masked only when the group was built with ``prune_batch_norms=True``. The
    masks are owned by :data:`OWNER`, so a sparsity mask on the same weight is never overwritten:
    the forward pass multiplies both.
    """
    keep = _check_keep(group, keep)
    roles = ("producer", "norm") if group.mask_norms else ("producer",)
    for member in group.members:
        if member.role not in roles:
            continue
        module = model.get_submodule(member.module_name)
        mask = masks.attach(module, member.param_name, owner=OWNER)
        kept = keep[member.channel]
        with torch.no_grad():
            mask.index_fill_(member.dim, member.index[kept], 1.0)
            mask.index_fill_(member.dim, member.index[~kept], 0.0)


def shrink(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    keep: Mapping[str, torch.Tensor],
    *,
    example_inputs: Inputs,
) -> nn.Module:
    """A smaller dense copy of ``model`` with the channels that ``keep`` drops removed.

    The copy has its masks folded in; ``model`` is unchanged. Groups absent from ``keep`` stay
    whole. Torch-Pruning does the surgery on a fresh graph of the copy, traced with
    ``example_inputs``.
    """
    small = copy.deepcopy(model)
    masks.fold(small)
    was_training = small.training
    dg = _trace(small, example_inputs)
    for group in groups:
        if group.name not in keep:
            continue
        _prune_group(dg, small, group, _check_keep(group, keep[group.name]))
    small.train(was_training)
    return small


def _prune_group(
    dg: tp.DependencyGraph, model: nn.Module, group: ChannelGroup, keep: torch.Tensor
) -> None:
    root = group.root
    dropped = root.index[~keep[root.channel]].tolist()
    if not dropped:
        return
    try:
        module = model.get_submodule(root.module_name)
    except AttributeError as err:
        raise CompressError(f"the model has no layer {root.module_name!r}") from err
    if module not in dg.module2node:
        raise CompressError(f"layer {root.module_name!r} is not used in the forward pass")
    fn = dg.get_pruner_of_module(module).prune_out_channels
    dg.get_pruning_group(module, fn, sorted(dropped)).prune(record_history=False)


def pruning_plan(
    groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor]
) -> dict[str, list[int]]:
    """Kept channel indices per group name: enough to rebuild the small model from its class."""
    by_name = {g.name: g for g in groups}
    return {
        name: torch.nonzero(_check_keep(by_name[name], k)).flatten().tolist()
        for name, k in keep.items()
        if name in by_name
    }


def save_pruned(
    small_model: nn.Module,
    plan: Mapping[str, list[int]],
    path: str | os.PathLike,
    example_inputs: Inputs,
) -> None:
    """Writes plan, input signature and weights; loadable with ``torch.load(weights_only=True)``.

    Written to a temporary file next to ``path`` and renamed, so a crash never leaves half a file.
    """
    inputs = _as_tuple(example_inputs)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "plan": {name: [int(i) for i in kept] for name, kept in plan.items()},
        "input_shapes": [list(x.shape) for x in inputs],
        "input_dtypes": [str(x.dtype).removeprefix("torch.") for x in inputs],
        "state_dict": small_model.state_dict(),
    }
    from compress.export import atomic_write

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read_pruned(path: Path) -> dict:
    from compress.export import safe_load  # checks the zip CRC, refuses pickled objects

    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompressError(f"{path}: not a pruned model file (format is not {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CompressError(
            f"{path}: version {payload.get('version')!r}, this library reads {VERSION}"
        )
    return payload


def load_pruned(fresh_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuilds the small model saved by :func:`save_pruned` from a fresh instance of its class.

    Example:
        >>> small = load_pruned(MyNet(), "out/model.pruned.pt")  # doctest: +SKIP
    """
    path = Path(path)
    payload = _read_pruned(path)
    inputs = [
        torch.zeros(shape, dtype=getattr(torch, dtype))
        for shape, dtype in zip(payload["input_shapes"], payload["input_dtypes"], strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only the groups named in the plan matter here
        # No numerical validation: it only leaves groups out, and the plan names the groups.
        groups = build_groups(
            fresh_model, inputs, prune_first_conv=True, prune_downsample_convs=True, validate=False
        )
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, kept in payload["plan"].items():
        if name not in by_name:
            raise CompressError(
                f"{path}: the plan prunes layer {name!r}, which this model cannot prune"
            )
        mask = torch.zeros(by_name[name].size, dtype=torch.bool)
        if kept and (min(kept) < 0 or max(kept) >= mask.numel()):
            raise CompressError(
                f"{path}: the plan keeps channels outside layer {name!r}'s {mask.numel()}"
            )
        mask[kept] = True
        keep[name] = mask
    try:
        small = shrink(fresh_model, groups, keep, example_inputs=inputs)
        small.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, CompressError) as err:
        raise CompressError(f"{path}: does not fit this model: {err}") from err
    return small


def round_keep(size: int, n_keep: int, round_to: int = 8) -> int:
    """Hardware-friendly kept width, as NNCF rounds filter counts.

    For a layer at least ``round_to`` wide, ``n_keep`` goes to the nearest multiple of
    ``round_to`` (halves round up), never below ``round_to`` and never above ``size``. Narrower
    layers, and ``round_to <= 1``, only clamp to ``[1, size]``. Never returns 0.

    Example:
        >>> round_keep(64, 29, 8), round_keep(64, 3, 8), round_keep(20, 20, 8), round_keep(6, 0, 8)
        (32, 8, 20, 1)
    """
    n_keep = min(max(n_keep, 1), size)
    if round_to <= 1 or size < round_to:
        return n_keep
    rounded = math.floor(n_keep / round_to + 0.5) * round_to
    return min(max(rounded, round_to), size)


def count_macs_params(model: nn.Module, example_inputs: Inputs) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass, counted by ``torch.utils.flop_counter``."""
    inputs = _as_tuple(example_inputs)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2, sum(p.numel() for p in model.parameters())


def shrunk_numel(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """Elements of every parameter (``"module.param"``) in the model :func:`shrink` would build.

    Each dimension loses the positions its groups drop. Counting without shrinking is what makes
    a search over pruning ratios (a FLOPs target) cheap: a conv or linear layer's MACs scale with
    its number of weight elements, since shrinking never changes spatial sizes.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> (g,) = build_groups(m, torch.randn(1, 3, 8, 8), prune_first_conv=True)
        >>> shrunk_numel(m, [g], {"0": torch.arange(8) < 2})
        {'0.weight': 54, '0.bias': 2, '2.weight': 8, '2.bias': 4}
    """
    dropped: dict[tuple[str, str, int], set[int]] = {}
    for group in groups:
        if group.name not in keep:
            continue
        k = _check_keep(group, keep[group.name])
        for m in group.members:
            gone = m.index[~k[m.channel]]
            if gone.numel():
                dropped.setdefault((m.module_name, m.param_name, m.dim), set()).update(
                    gone.tolist()
                )
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = math.prod(
                size - len(dropped.get((mod_name, p_name, d), ()))
                for d, size in enumerate(param.shape)
            )
    return out
