"""Masks of sharded weights (FSDP2's ``fully_shard``): DTensor helpers and the distributed k-th
smallest score.

FSDP2 stores every parameter as a DTensor sharded along dim 0 over a one-dimensional device
mesh. A mask attached to such a weight is a DTensor with the same placements, so each rank holds
the mask of its own rows only; mask updates work on local shards. A global threshold is the k-th
smallest score over all ranks, found by radix selection: eight (or, for scores of 32 bits or
less, four) passes, each all-reducing one 256-bin histogram of the candidates' next key byte
(2 kB per pass), never an all-gather of scores or weights. Every rank ends with the same
threshold and the same tie budget, hence the same masks as one process holding every weight.

Supported order: ``fully_shard`` first, then ``create_compressed_model`` (Lightning: shard in
``configure_model``; the callback builds its controller after it). Masks attached before
``fully_shard`` would stay whole on every rank; the controller refuses them at the next update.

Example:
    >>> import torch
    >>> kth_smallest([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 5.0])], 3, None)
    (2.0, 2, 1)
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from compress.errors import CompressError

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = Replicate = Partial = None  # type: ignore[assignment,misc]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (a parameter or mask sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> torch.Tensor:
    """The part of ``t`` this rank holds (``t`` itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: Any) -> torch.Tensor:
    """The whole of ``t`` on every rank (an all-gather when sharded): for reductions read as
    numbers (a sum of a DTensor is a partial sum until it is gathered) and for exports."""
    return t.full_tensor() if is_sharded(t) else t


def whole(state: Any) -> Any:
    """``state`` (nested dicts and lists) with every sharded tensor gathered whole."""
    return _each_sharded(state, lambda t: t.full_tensor())


def _each_sharded(state: Any, fn: Callable[[Any], Any]) -> Any:
    """``state`` (nested dicts and lists) with ``fn`` of every sharded tensor in its place."""
    if is_sharded(state):
        return fn(state)
    if isinstance(state, Mapping):
        return {k: _each_sharded(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [_each_sharded(v, fn) for v in state]
    return state


def to_rank_zero(t: Any) -> torch.Tensor | None:
    """The whole of a sharded ``t`` on rank 0 of its mesh and None on the other ranks (one
    gather: only the rank that writes a file holds the whole tensor); ``t`` itself when it is
    not sharded. Every rank of the mesh must call it."""
    if not is_sharded(t):
        return t  # type: ignore[no-any-return]
    _check_layout(t)
    group = t.device_mesh.get_group()
    rank, world = t.device_mesh.get_local_rank(), t.device_mesh.size()
    rows = t.shape[0]
    part = t.to_local()
    wire = part.to(torch.uint8) if part.dtype == torch.bool else part  # gloo has no bool
    padded = wire.new_zeros((-(-rows // world), *t.shape[1:]))  # torch.chunk's piece size
    padded[: part.shape[0]] = wire
    pieces = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, 0), group=group)
    if pieces is None:
        return None
    return torch.cat(pieces)[:rows].to(part.dtype)


def whole_on_rank_zero(state: Any) -> Any:
    """``state`` (nested dicts and lists) with every sharded tensor gathered whole on rank 0
    (None in its place on the other ranks): for what only rank 0 writes, a checkpoint entry."""
    return _each_sharded(state, to_rank_zero)


def scalar(t: torch.Tensor) -> float:
    """A one-element tensor (a sum, a max) as a float, reduced over the ranks when sharded."""
    return float(full(t))


def reduced(partials: Sequence[torch.Tensor], of: Sequence[Any], op: str = "sum") -> list[float]:
    """Each one-element ``partials[i]``, computed from this rank's part of ``of[i]``, reduced
    over the ranks (``op``: "sum" or "max") where ``of[i]`` is sharded, as floats: one
    all-reduce for all of them, where ``scalar`` of each runs one per tensor (a mask update
    reads several figures per masked tensor: docs/sharded.md). No collective when none is
    sharded. Float64 holds every count, bool and float32 exactly.

    Example:
        >>> reduced([torch.tensor(2), torch.tensor(True)], [torch.zeros(2), torch.zeros(1)])
        [2.0, 1.0]
    """
    if not partials:
        return []
    values = torch.stack([p.detach().reshape(()).to(torch.float64) for p in partials])
    group = group_of([t for t in of if is_sharded(t)])
    if group is not None:
        sharded = torch.tensor([is_sharded(t) for t in of])
        mine = values[sharded].to(next(t for t in of if is_sharded(t)).device)
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(mine, op=reduce_op, group=group)
        values[sharded] = mine.to(values.device)
    return values.tolist()  # type: ignore[no-any-return]


def norms(tensors: Sequence[Any]) -> list[torch.Tensor]:
    """The L2 norm of each of ``tensors`` as a one-element tensor on this rank; a sharded
    tensor's is its whole norm, for all of them with one all-reduce of the local squared norms
    (the value ``DTensor.norm(2)`` gives, which runs one all-reduce per tensor: its local norms
    squared, summed over the ranks, to the power 1/2). ``t.norm(2)`` when none is sharded."""
    group = group_of([t for t in tensors if is_sharded(t)])
    if group is None:
        return [t.norm(2) for t in tensors]
    found = [local(t).norm(2) for t in tensors]
    sharded = [i for i, t in enumerate(tensors) if is_sharded(t)]
    squares = torch.stack([found[i] for i in sharded]) ** 2
    dist.all_reduce(squares, group=group)
    for i, n in zip(sharded, squares ** (1.0 / 2)):
        found[i] = n
    return found


def like(part: torch.Tensor, ref: Any) -> torch.Tensor:
    """``part`` (this rank's piece) as a DTensor laid out like ``ref``; ``part`` itself when
    ``ref`` is not sharded."""
    if not is_sharded(ref):
        return part
    return DTensor.from_local(
        part, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride()
    )


def shard_like(whole: torch.Tensor, ref: Any) -> torch.Tensor:
    """A tensor every rank holds whole (a saved mask, a fixed random score), cut as ``ref`` is
    cut, without communication; ``whole`` itself when ``ref`` is not sharded."""
    if not is_sharded(ref) or is_sharded(whole):
        return whole
    _check_layout(ref)
    rank, world = ref.device_mesh.get_local_rank(), ref.device_mesh.size()
    part = torch.chunk(whole, world, dim=0)
    piece = part[rank] if rank < len(part) else whole[:0]
    return like(piece.to(ref.device).contiguous(), ref)


def held(t: Any, dim: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which, where) for positions ``index`` along ``dim`` of ``t``: ``which`` are the entries
    of ``index`` this rank holds, ``where`` their positions in its local part. Under
    ``Shard(0)`` the rows along dim 0 are cut as ``torch.chunk`` cuts them (FSDP2's cut); every
    other dim is held whole.

    Example:
        >>> held(torch.zeros(4, 2), 0, torch.tensor([3, 1]))
        (tensor([0, 1]), tensor([3, 1]))
    """
    if dim != 0 or not is_sharded(t):
        return torch.arange(len(index)), index
    _check_layout(t)
    rank, world = t.device_mesh.get_local_rank(), t.device_mesh.size()
    rows = t.shape[0]
    size = -(-rows // world)
    start = min(rank * size, rows)
    assert local(t).shape[0] == min(start + size, rows) - start  # torch.chunk's cut
    which = ((index >= start) & (index < start + size)).nonzero().squeeze(1)
    return which, index[which] - start


def sum_over_ranks(t: torch.Tensor, like_of: Any) -> torch.Tensor:
    """``t`` summed in place over the ranks of the sharded ``like_of`` (``t`` as it is when
    ``like_of`` is not sharded)."""
    if is_sharded(like_of):
        dist.all_reduce(t, group=like_of.device_mesh.get_group())
    return t


def reshard(model: nn.Module) -> None:
    """Frees the gathered parameters FSDP2 keeps after a forward pass outside training (the
    root module keeps its own unsharded after forward, for the backward pass that follows in
    training), so that the parameters are DTensors again; nothing for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _check_layout(t: Any) -> None:
    """The layouts the masks handle: FSDP2's, sharded along dim 0 over a 1-D mesh."""
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise CompressError(
            f"a weight is laid out as {tuple(t.placements)} over a {t.device_mesh.ndim}-D mesh; "
            "masks follow FSDP2's layout only (Shard(0) over one data-parallel mesh "
            "dimension): apply fully_shard(module, mesh=mesh['data_parallel'])"
        )


def group_of(tensors: Sequence[Any]) -> dist.ProcessGroup | None:
    """The process group of the sharded ``tensors`` (None when none is sharded). Sharded and
    whole weights are not mixed in one selection: every rank would count the whole ones."""
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise CompressError(
            f"{len(tensors) - len(sharded)} of {len(tensors)} compressed weights are not "
            "sharded while the others are: fully_shard the whole network (the root module "
            "too), or put the unsharded layers in ignored_scopes"
        )
    for t in sharded:
        _check_layout(t)
    return sharded[0].device_mesh.get_group()


# --- the distributed k-th smallest ---------------------------------------------------------


def _keys(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer keys in the order of the float values, the 32-bit patterns as int32 (half the
    bytes to read and write of int64) or the 64-bit ones as int64; -0.0 is 0.0 (adding 0.0
    turns it into +0.0)."""
    if bits == 32:
        raw = (t.detach().reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
        return torch.where(raw >= 0, raw, raw ^ 0x7FFFFFFF)
    raw = (t.detach().reshape(-1).to(torch.float64) + 0.0).view(torch.int64)
    return torch.where(raw >= 0, raw, raw ^ 0x7FFFFFFFFFFFFFFF)


def _value(key: int, bits: int) -> float:
    """The float whose key is ``key`` (the inverse of ``_keys``)."""
    flip = (1 << (bits - 1)) - 1
    raw = key if key >= 0 else key ^ flip
    if bits == 32:
        return float(struct.unpack("<f", struct.pack("<i", raw))[0])
    return float(struct.unpack("<d", struct.pack("<q", raw))[0])


def _digit(keys: torch.Tensor, shift: int, top: bool) -> torch.Tensor:
    """The key byte at ``shift`` as 0..255 (uint8), in key order (the top byte carries the
    sign)."""
    d = keys >> shift
    return ((d + 128) & 0xFF if top else d & 0xFF).to(torch.uint8)


def kth_smallest(
    parts: Sequence[torch.Tensor], k: int, group: dist.ProcessGroup | None
) -> tuple[float, int, int]:
    """The k-th smallest value (1-based) over ``parts`` on every rank of ``group`` together, how
    many values are smaller and how many equal to it. Exact: radix selection on the values'
    bit patterns, one all-reduced 256-bin histogram per key byte. NaN is not allowed in
    ``parts``.
    """
    return kth_smallests([parts], [k], group)[0]


def kth_smallests(
    selections: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], group: dist.ProcessGroup | None
) -> list[tuple[float, int, int]]:
    """``kth_smallest(parts, k, group)`` of every (parts, k) of ``selections`` and ``ks``, the
    histograms of all selections all-reduced together: four (or eight) all-reduces in all, not
    four per selection (a local mask update selects in every layer on its own)."""
    if not selections:
        return []
    floats = [p.dtype for parts in selections for p in parts]
    bits = 32 if all(torch.finfo(d).bits <= 32 for d in floats) else 64
    device = next((p.device for parts in selections for p in parts), torch.device("cpu"))
    # the keys still in the running, per part; None: all of them (first pass: no full-size key
    # tensor outlives its part's turn, the candidates' keys are computed from their values)
    cands: list[list[torch.Tensor | None]] = [[None] * len(parts) for parts in selections]
    rests = list(ks)
    keys = [0] * len(selections)
    for shift in range(bits - 8, -8, -8):
        top = shift == bits - 8
        hist = torch.zeros(len(selections), 256, dtype=torch.int64, device=device)
        digits: list[list[torch.Tensor]] = []  # this pass's byte of every candidate
        for h, parts, cs in zip(hist, selections, cands):
            digits.append(
                [_digit(_keys(p, bits) if c is None else c, shift, top) for p, c in zip(parts, cs)]
            )
            for d in digits[-1]:
                h += torch.bincount(d, minlength=256)
        if group is not None:
            dist.all_reduce(hist, group=group)
        cum = hist.cumsum(1)
        for j, (parts, cs, ds) in enumerate(zip(selections, cands, digits)):
            b = int(torch.searchsorted(cum[j], torch.tensor(rests[j], device=device)))
            rests[j] -= int(cum[j, b - 1]) if b > 0 else 0
            keys[j] = keys[j] * 256 + b
            for i, (p, c, d) in enumerate(zip(parts, cs, ds)):
                at = d == b
                cs[i] = _keys(p.reshape(-1)[at], bits) if c is None else c[at]
    offset = 1 << (bits - 1)  # the top byte was offset by 128
    return [
        (_value(key - offset, bits), k - rest, int(h[key % 256]))
        for key, k, rest, h in zip(keys, ks, rests, hist)
    ]


def global_keep_masks(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks pruning exactly ``k`` of the lowest scores over all sharded ``scores``
    together, laid out as they are; ties at the threshold are pruned in tensor order, then
    by position (rank order is row order under ``Shard(0)``), as on one process. The tie
    counts per rank and tensor are all-gathered only when some ties are kept."""
    return keep_masks([scores], [k])[0]


def keep_masks(
    selections: Sequence[Sequence[torch.Tensor]], ks: Sequence[int]
) -> list[list[torch.Tensor]]:
    """``global_keep_masks(scores, k)`` of every (scores, k) of ``selections`` and ``ks``, with
    the selections' collectives together: the histograms of all in one all-reduce per pass, the
    tie counts of those that keep ties in one all-gather."""
    group = group_of([s for scores in selections for s in scores])
    parts = [[local(s) for s in scores] for scores in selections]
    out: list[list[torch.Tensor]] = [[] for _ in selections]
    todo = []
    for j, (scores, k) in enumerate(zip(selections, ks)):
        if k <= 0 or k >= sum(s.numel() for s in scores):
            out[j] = [
                like(torch.full_like(p, k <= 0, dtype=torch.bool), s)
                for p, s in zip(parts[j], scores)
            ]
        else:
            todo.append(j)
    tied = []
    for j, (t, below, equal) in zip(
        todo, kth_smallests([parts[j] for j in todo], [ks[j] for j in todo], group)
    ):
        if ks[j] - below == equal:  # every tie is pruned: no order among them to agree on
            out[j] = [like(p > t, s) for p, s in zip(parts[j], selections[j])]
        else:
            tied.append((j, t, ks[j] - below))
    if not tied:
        return out
    ties = torch.stack([(p == t).sum() for j, t, _ in tied for p in parts[j]]).reshape(1, -1)
    rank = dist.get_rank(group) if group is not None else 0
    if group is not None:
        every = [torch.empty_like(ties) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, ties, group=group)
        ties = torch.cat(every)  # [rank, tensor]
    col = 0
    for j, t, left in tied:
        mine = ties[:, col : col + len(parts[j])]
        col += len(parts[j])
        for i, (p, s) in enumerate(zip(parts[j], selections[j])):
            before = int(mine[:, :i].sum()) + int(mine[:rank, i].sum())
            take = max(0, min(left - before, int(mine[rank, i])))
            keep = p > t
            if take < int(mine[rank, i]):
                at = (p == t).reshape(-1).nonzero().squeeze(1)
                keep.view(-1)[at[take:]] = True
            out[j].append(like(keep, s))
    return out


# --- learned masks (RB) ----------------------------------------------------------------------


def gathered(theta: Any) -> torch.Tensor:
    """A sharded parameter (RB's logits) whole for the forward pass; its gradient is averaged
    over the ranks and cut back to the shard (a reduce-scatter), as DDP averages it."""
    whole_theta: torch.Tensor = theta.redistribute(theta.device_mesh, [Replicate()]).to_local(
        grad_placements=[Partial("avg")]
    )
    return whole_theta


class _Summed(torch.autograd.Function):
    """A sum over the ranks whose gradient stays on each rank: for a term every rank computes
    alike (RB's density loss), whose gradient every rank then holds whole already."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def summed(x: torch.Tensor, like_of: Any) -> torch.Tensor:
    """``x`` (computed from this rank's shard of ``like_of``) summed over its ranks."""
    return _Summed.apply(x, like_of.device_mesh.get_group())


# --- masks in the forward pass and at updates -----------------------------------------------


def mask_for(mask: Any, param: torch.Tensor) -> torch.Tensor:
    """The mask as the forward pass needs it: FSDP2 gathers a sharded weight whole before the
    layer runs, so its sharded (one-byte) mask is gathered too: one byte per weight sent, and
    one kept for the backward pass."""
    if is_sharded(mask) and not is_sharded(param):
        gathered_mask: torch.Tensor = mask.full_tensor()
        return gathered_mask
    return mask


def gathers(module: nn.Module, param: torch.Tensor, buffers: Sequence[str]) -> bool:
    """Whether the forward pass gathers ``module``'s masks: FSDP2 gathered the weight."""
    return bool(buffers) and not is_sharded(param) and is_sharded(getattr(module, buffers[0]))


def recomputed(values: Mapping[str, torch.Tensor], compute: Callable[[str], torch.Tensor]) -> Any:
    """Entered saved-tensor hooks under which autograd keeps, instead of each of ``values`` (a
    masked weight of the layer running now), its name, and recomputes it with
    ``compute(name)`` when the backward pass needs it (by then FSDP2 has gathered the weight
    again). The caller exits them after the layer's forward pass."""
    # autograd saves views (a Linear saves the weight transposed): found by their storage
    names = {v.untyped_storage().data_ptr(): name for name, v in values.items()}

    def pack(t: torch.Tensor) -> Any:
        plain = t.layout == torch.strided and not is_sharded(t)
        name = names.get(t.untyped_storage().data_ptr()) if plain else None
        if name is None:
            return t
        return (_RECOMPUTE, name, t.size(), t.stride(), t.storage_offset())

    def unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, tuple) and saved[0] is _RECOMPUTE:
            _, name, size, stride, offset = saved
            with torch.no_grad():
                return compute(name).as_strided(size, stride, offset)
        return saved  # type: ignore[no-any-return]

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
    hooks.__enter__()
    return hooks


def others_save() -> bool:
    """Whether saved-tensor hooks are active already (activation checkpointing or offloading):
    only the innermost hooks run, so ``recomputed`` would take over theirs; it stands back."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


_RECOMPUTE = object()


def check_placed(masked: Iterable[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Refuses masks attached before ``fully_shard`` (the weight sharded, its mask whole), given
    (module, parameter name, mask) triples."""
    for module, pname, mask in masked:
        if is_sharded(module._parameters.get(pname)) and not is_sharded(mask):
            raise CompressError(
                f"{type(module).__name__}.{pname} was sharded (fully_shard) after its mask was "
                "attached: apply fully_shard first, then create_compressed_model (with "
                "Lightning, shard in configure_model; CompressionCallback builds its "
                "controller after it)"
            )


# --- a whole copy for export ----------------------------------------------------------------

_FSDP_KEYS = ("__composable_api_state_key", "_fsdp_use_orig_params", "_is_fsdp_managed_module")


def _plain_class(module: nn.Module) -> type[nn.Module]:
    """The module's own class: ``fully_shard`` swaps it for a subclass ``FSDP<Class>``."""
    cls = type(module)
    if cls.__module__.startswith("torch.distributed.fsdp"):
        return next(b for b in cls.__bases__ if not b.__module__.startswith("torch.distributed"))
    return cls


def _ours(hook: Any) -> bool:
    """A hook not registered by FSDP (masks, RB, the callback's state_dict hooks)."""
    fn = getattr(hook, "func", hook)
    return not str(getattr(fn, "__module__", "")).startswith("torch.distributed")


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded, CPU) copy of a model sharded by ``fully_shard``, masks and their hooks
    included, on rank 0; None on the other ranks. Every rank must call it. Parameters and
    persistent buffers come from ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``
    (gathered once, to rank 0); the sharded tensors the state_dict leaves out (masks, RB logits)
    are gathered whole to rank 0 too. ``copy.deepcopy`` refuses FSDP modules; this copies
    module by module.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    saved = set(model.state_dict(keep_vars=True))  # the same names on every rank
    tensors: dict[int, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in saved:
            if name in state:  # rank 0
                tensors[id(t)] = state[name]
        elif is_sharded(t):
            gathered = to_rank_zero(t.detach())  # every rank, in the same order
            if gathered is not None:
                tensors[id(t)] = gathered.cpu()
        else:
            tensors[id(t)] = t.detach().cpu().clone()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return _rebuilt(model, tensors, lambda t: t.clone())


def from_rank_zero(compute: Callable[[], Any]) -> Any:
    """``compute()`` run on rank 0 only, its result (a picklable object: a latency table) sent
    to every rank; ``compute()`` itself when no process group is initialised. Every rank must
    call it. When ``compute`` fails on rank 0 the other ranks raise a ``CompressError`` naming
    the failure instead of waiting for a result that never comes.

    Example:
        >>> from_rank_zero(lambda: {"model_ms": 1.0})  # one process
        {'model_ms': 1.0}
    """
    if not dist.is_initialized():
        return compute()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = (True, compute())
        except Exception as err:  # noqa: BLE001 - raised again below, once the others know
            box[0], failure = (False, f"{type(err).__name__}: {err}"), err
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    ok, value = box[0]
    if not ok:
        raise CompressError(f"rank 0 failed computing what every rank needs: {value}")
    return value


def meta_copy(model: nn.Module) -> nn.Module:
    """A plain copy of a model sharded by ``fully_shard`` with every parameter and buffer on the
    meta device in its whole shape (masks and their hooks included): the structure to trace
    (Torch-Pruning's channel groups, MACs), since DTensors cannot be traced. No communication,
    no memory for values; every rank builds the same copy.

    Example:
        >>> meta_copy(nn.Linear(4, 2)).weight.device
        device(type='meta')
    """
    tensors = {
        id(t): torch.empty(t.shape, dtype=t.dtype, device="meta")
        for t in [*model.parameters(), *model.buffers()]
    }
    return _rebuilt(model, tensors, lambda t: t)


def _rebuilt(
    model: nn.Module, tensors: Mapping[int, torch.Tensor], fresh: Callable[[Any], torch.Tensor]
) -> nn.Module:
    """``model`` copied module by module (``copy.deepcopy`` refuses FSDP modules) with the
    FSDP classes and hooks left out; ``tensors`` gives each parameter's and buffer's value by
    the id of the original, ``fresh`` the copy of a parameter's value."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(fresh(tensors[id(p)]), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = tensors[id(b)]
    for m in model.modules():
        cls = _plain_class(m)
        memo[id(m)] = cls.__new__(cls)
    for m in model.modules():
        new = memo[id(m)]
        for key, value in m.__dict__.items():
            if key.startswith(_FSDP_KEYS):
                continue
            if key.endswith("hooks"):
                new.__dict__[key] = type(value)((i, h) for i, h in value.items() if _ours(h))
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
    copy_of: nn.Module = memo[id(model)]
    return copy_of
