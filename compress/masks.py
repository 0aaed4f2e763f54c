"""The one masking mechanism shared by every algorithm: attach, update, fold, remove.

A masked parameter keeps its place in the module (``module.weight`` stays the registered
``nn.Parameter``), so ``model.state_dict()`` has exactly the original keys while the model is
compressed, and a checkpoint loads into the plain model class. During ``forward`` a pre-hook
shadows the attribute with ``param * mask``; a post-hook removes the shadow. Autograd therefore
sees the product: pruned weights get zero gradient and the optimizer keeps its references.
:func:`cover` extends the shadow to the whole forward pass of the module that calls the layer,
for modules that read a child's weight without calling it (``nn.MultiheadAttention``).

The rule, as in ``torch.ao`` pruning: the mask tensor is created once and then only updated in
place (``copy_``), so DDP, optimizers and ``.to(device)`` keep valid references.

A mask is one byte per weight (``MASK_DTYPE``, uint8 holding 0 and 1), in eager and compiled
passes alike: ``param * mask`` computes in the weight's dtype without a converted copy, and
autograd keeps the one-byte mask for the gradient. uint8 rather than bool: on CPU the product
with a bool tensor took 2.5x as long as with a float one, with uint8 about as long. A mask
written with floats (``copy_`` of a 0./1. tensor, an old checkpoint) is cast on the way in.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 2)
    >>> mask = attach(layer, "weight")
    >>> mask.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))  # doctest: +ELLIPSIS
    tensor(...)
    >>> mask.dtype, mask.element_size()
    (torch.uint8, 1)
    >>> sorted(layer.state_dict())
    ['bias', 'weight']
    >>> fold(layer)
    >>> int((layer.weight == 0).sum())
    6
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.errors import CompressError

_MASK_PREFIX = "_cmask_"
MASK_DTYPE = torch.uint8
"""The dtype of every mask buffer: one byte per weight, 0 or 1."""
_STATE = "_compress_masked"  # attribute on a module: {param_name: _Masking}
_COVER = "_compress_cover"  # attribute on a module: the masked submodules its forward may read
_COVERED = "_compress_covered"  # set on a masked module while an ancestor's forward shadows it
_SAVED = "_compress_saved"  # attribute on a module during its forward pass: saved-tensor hooks

MaskFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""Computes the effective parameter from (module, param); used by learned masks (RB)."""


class _Masking:
    """How one parameter is masked: an optional function, then the product of mask buffers."""

    __slots__ = ("fn", "buffers", "ones", "straight", "home")

    def __init__(self) -> None:
        # a module that shares a masked parameter it does not own reads it through its home:
        # (module, name) holding the masks
        self.home: tuple[nn.Module, str] | None = None
        self.fn: MaskFn | None = None
        self.buffers: list[str] = []
        # buffers their owner declared all ones: left out of the product
        self.ones: set[str] = set()
        # buffers applied in the forward pass only: the gradient passes them unmasked
        self.straight: set[str] = set()


def mask_name(param_name: str, owner: str = "") -> str:
    return _MASK_PREFIX + param_name + (f"_{owner}" if owner else "")


def _compute(module: nn.Module, name: str, param: torch.Tensor, m: _Masking) -> torch.Tensor:
    if m.home is not None:
        home, home_name = m.home
        return _compute(home, home_name, param, home.__dict__[_STATE][home_name])
    out = m.fn(module, param) if m.fn else param
    for buf in m.buffers:
        if buf in m.ones:
            continue
        mask = distributed.mask_for(getattr(module, buf), param)
        if buf in m.straight:
            # value out * mask (exactly: out + (0 - out) is 0), gradient of the identity
            out = out + (out * mask - out).detach()
        else:
            out = out * mask
    return out


def _shadow(module: nn.Module) -> None:
    state = module.__dict__.get(_STATE, {})
    gathered = {}
    for name, m in state.items():
        if name not in module._parameters:
            raise CompressError(taken_over(type(module).__name__, module, name))
        param = module._parameters[name]
        if param is None:
            continue
        # An instance attribute wins over nn.Module.__getattr__, which is what finds parameters.
        value = module.__dict__[name] = _compute(module, name, param, m)
        if m.fn is None and m.home is None and distributed.gathers(module, param, m.buffers):
            gathered[name] = value
    if (
        gathered
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not distributed.others_save()
    ):
        # FSDP2 frees the gathered weight after the forward pass and gathers it again for the
        # backward pass; the masked product is recomputed then instead of kept whole till then
        module.__dict__[_SAVED] = distributed.recomputed(
            gathered, lambda name: _compute(module, name, _param(module, name), state[name])
        )


def taken_over(where: str, module: nn.Module, name: str) -> str:
    """What took ``module.<name>`` away from the masks: ``torch.nn.utils.prune`` (Lightning's
    ``ModelPruning``) or a parametrization, added after the masks."""
    if hasattr(module, name + "_orig") and hasattr(module, name + "_mask"):
        other = "torch.nn.utils.prune (Lightning's ModelPruning callback, or prune.* on it)"
    elif name in getattr(module, "parametrizations", {}):
        other = "a parametrization (torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm)"
    else:
        other = "something that replaced the parameter"
    return (
        f"{where}: its {name} is masked by this library and was then taken over by {other}; "
        "two pruners on one weight would each undo the other's zeros. Use one of them: remove "
        "the other pruner (or its reparametrization) or leave this layer out of the recipe "
        "(ignored_scopes)"
    )


def check_owned(model: nn.Module) -> None:
    """Raises ``CompressError`` naming the first masked module whose parameter another mechanism
    (``torch.nn.utils.prune``, a parametrization) took over after the masks were attached."""
    for mod_name, module in model.named_modules():
        for name in module.__dict__.get(_STATE, {}):
            if name not in module._parameters:
                raise CompressError(taken_over(f"layer {mod_name!r}", module, name))


def _unshadow(module: nn.Module) -> None:
    saved = module.__dict__.pop(_SAVED, None)
    if saved is not None:
        saved.__exit__(None, None, None)
    for name in module.__dict__.get(_STATE, {}):
        module.__dict__.pop(name, None)


def _pre_hook(module: nn.Module, args: object) -> None:
    if _COVERED not in module.__dict__:  # else the calling module's forward shadows it already
        _shadow(module)


def _post_hook(module: nn.Module, args: object, output: object) -> None:
    if _COVERED not in module.__dict__:
        _unshadow(module)


def _cover_pre_hook(module: nn.Module, args: object) -> None:
    for inner in module.__dict__[_COVER]:
        _shadow(inner)
        inner.__dict__[_COVERED] = True


def _cover_post_hook(module: nn.Module, args: object, output: object) -> None:
    for inner in reversed(module.__dict__[_COVER]):
        inner.__dict__.pop(_COVERED, None)
        _unshadow(inner)


def _hook(module: nn.Module) -> dict[str, _Masking]:
    """The module's masking state, with the hooks that apply it registered once."""
    state = module.__dict__.get(_STATE)
    if state is None:
        state = {}
        module.__dict__[_STATE] = state
        module.register_forward_pre_hook(_pre_hook)
        module.register_forward_hook(_post_hook, always_call=True)
    return state


def tie(model: nn.Module) -> list[str]:
    """Makes every module of ``model`` that holds a masked parameter without masking it (an
    ``Embedding`` sharing its weight with a masked output ``Linear``) read the masked value
    too; returns the names of the modules it tied. Called once all masks are attached."""
    homes: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, m in module.__dict__.get(_STATE, {}).items():
            if m.home is None and m.buffers:
                homes.setdefault(id(module._parameters[name]), (module, name))
    tied = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            home = homes.get(id(param)) if param is not None else None
            if home is None or name in module.__dict__.get(_STATE, {}):
                continue
            m = _Masking()
            m.home = home
            _hook(module)[name] = m
            tied.append(f"{mod_name}.{name}")
    return tied


def cover(model: nn.Module) -> list[str]:
    """Makes a masked parameter read masked for the whole forward pass of the module that reads
    it without calling its owner; returns the names of those readers. Called once all masks are
    attached.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself (``F.multi_head_attention_forward``)
    and torchvision's Swin attention calls ``F.linear(x, self.qkv.weight)``. Shadowed only by the
    owner's pre-hook, such a weight would be read unmasked while training, and the stripped
    model, in which the mask is folded, would compute something else. A reader is the nearest
    ancestor with a ``forward`` of its own whose source names ``self.<child>.<parameter>`` of a
    masked child. Only those are covered: every other weight keeps being shadowed for its own
    layer's forward alone (one masked product alive at a time, and FSDP2 gathers the layer
    before its pre-hook runs). A read this misses still fails ``strip()``'s output check.
    """
    readers: dict[int, tuple[str, nn.Module, list[nn.Module]]] = {}
    paths = dict(model.named_modules(remove_duplicate=False))
    for path, module in paths.items():
        state = module.__dict__.get(_STATE)
        if not path or not state:
            continue
        parent, child = path, path
        while parent:
            child = parent
            parent = parent.rpartition(".")[0]
            if type(paths[parent]).forward is not nn.Module.forward:  # not a ModuleList
                break
        attr = child[len(parent) + 1 :] if parent else child
        if not _reads_child(type(paths[parent]).forward, attr.partition(".")[0], tuple(state)):
            continue
        _, _, inner = readers.setdefault(id(paths[parent]), (parent, paths[parent], []))
        if all(m is not module for m in inner):
            inner.append(module)
    for _, reader, inner in readers.values():
        known = reader.__dict__.setdefault(_COVER, [])
        if not known:
            reader.register_forward_pre_hook(_cover_pre_hook)
            reader.register_forward_hook(_cover_post_hook, always_call=True)
        known.extend(m for m in inner if all(m is not k for k in known))
    return [name for name, _, _ in readers.values()]


@functools.cache
def _reads_child(forward: Callable[..., Any], attr: str, params: tuple[str, ...]) -> bool:
    """Whether the source of ``forward`` reads ``self.<attr>.<param>`` for one of ``params``."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):  # no source (compiled, generated): nothing known to cover
        return False
    names = "|".join(re.escape(p) for p in params)
    return re.search(rf"self\.{re.escape(attr)}\.(?:{names})\b", source) is not None


def attach(
    module: nn.Module,
    name: str = "weight",
    *,
    owner: str = "",
    fn: MaskFn | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masks ``module.<name>`` with an all-ones mask buffer and returns the buffer.

    The buffer is non-persistent: it never enters ``state_dict``. The controller saves masks in
    its own state. Each ``owner`` (an algorithm) has its own buffer and the forward pass uses
    the product of all of them, so combined algorithms never overwrite each other's zeros.
    Attaching twice with the same owner returns the existing mask. ``fn`` computes the
    parameter before the buffers multiply it (learned masks). ``mask`` shares an existing mask
    tensor, for a parameter tied between modules.
    """
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}")
    m = _hook(module).setdefault(name, _Masking())
    if fn is not None:
        m.fn = fn
    buf = mask_name(name, owner)
    if buf in m.buffers:
        return getattr(module, buf)
    if mask is None:
        mask = torch.ones_like(param, dtype=MASK_DTYPE)
    assert mask.dtype == MASK_DTYPE, f"a shared mask is {mask.dtype}"
    module.register_buffer(buf, mask, persistent=False)
    m.buffers.append(buf)
    return mask


def declare_ones(
    module: nn.Module, name: str = "weight", owner: str = "", ones: bool = True
) -> None:
    """Declares that ``owner``'s mask on ``module.<name>`` holds only ones (``ones=True``), so the
    forward pass leaves it out of the product (one multiply and its backward less per step), or
    that it may hold zeros again (``ones=False``). The contents are not checked: the owner
    declares ``False`` before it writes a zero. Used by RB, whose buffer stays all ones while the
    logits learn."""
    _flag(module, name, owner, "ones", ones)


def straight_through(
    module: nn.Module, name: str = "weight", owner: str = "", on: bool = True
) -> None:
    """With ``on``, ``owner``'s mask on ``module.<name>`` still zeroes the forward value, but the
    parameter gets the gradient of the masked one unmasked (straight-through), so that pruned
    weights keep learning; ``on=False`` masks the gradient again (the default)."""
    _flag(module, name, owner, "straight", on)


def _flag(module: nn.Module, name: str, owner: str, kind: str, on: bool) -> None:
    """Adds ``owner``'s buffer on ``module.<name>`` to, or removes it from, the set ``kind``."""
    m = module.__dict__.get(_STATE, {}).get(name)
    buf = mask_name(name, owner)
    if m is None or buf not in m.buffers:
        raise ValueError(f"{type(module).__name__}.{name} has no mask of owner {owner!r}")
    flagged: set[str] = getattr(m, kind)
    if on:
        flagged.add(buf)
    else:
        flagged.discard(buf)


def get_mask(module: nn.Module, name: str = "weight", owner: str = "") -> torch.Tensor | None:
    m = module.__dict__.get(_STATE, {}).get(name)
    buf = mask_name(name, owner)
    return getattr(module, buf) if m is not None and buf in m.buffers else None


def others(module: nn.Module, name: str = "weight", owner: str = "") -> torch.Tensor | None:
    """The product of the masks other owners put on ``module.<name>`` (None if there are none),
    so that an algorithm can leave alone what another one already removed."""
    m = module.__dict__.get(_STATE, {}).get(name)
    if m is None:
        return None
    own = mask_name(name, owner)
    out = None
    for buf in m.buffers:
        if buf != own:
            out = getattr(module, buf) if out is None else out * getattr(module, buf)
    return out


def masked_names(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.__dict__.get(_STATE, ()))


def iter_masked(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Yields (module name, module, param name, mask) for every mask buffer."""
    for mod_name, module in model.named_modules():
        for name, m in module.__dict__.get(_STATE, {}).items():
            for buf in m.buffers:
                yield mod_name, module, name, getattr(module, buf)


def _param(module: nn.Module, name: str) -> nn.Parameter:
    """The masked parameter itself (a masked parameter is never unset)."""
    param = module._parameters[name]
    assert param is not None, f"{type(module).__name__}.{name} is None"
    return param


def effective(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The parameter as the forward pass sees it (masked), without autograd history."""
    param = _param(module, name)
    m = module.__dict__.get(_STATE, {}).get(name)
    with torch.no_grad():
        return param.detach() if m is None else _compute(module, name, param, m).detach()


def fold(model: nn.Module) -> None:
    """Writes the masks into the parameters and removes every hook and mask buffer. Every
    value is computed before any is written, so that a parameter shared between modules is
    masked once, with all of its masks in place."""
    masked = [m for m in model.modules() if _STATE in m.__dict__]
    values = [(m, name, effective(m, name)) for m in masked for name in m.__dict__[_STATE]]
    with torch.no_grad():
        for module, name, value in values:
            _param(module, name).copy_(value)
    for module in model.modules():
        remove(module)


def check_finite(model: nn.Module, what: str) -> None:
    """Raises ``CompressError`` naming the first parameter or buffer that holds NaN or Inf."""
    for key, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            if not bool(torch.isfinite(t.detach()).all()):
                raise CompressError(
                    f"{what}: {key} holds NaN or Inf; the weights diverged during training "
                    "(lower the learning rate or check the loss) and are not written"
                )


def remove(module: nn.Module) -> None:
    """Detaches the masking from one module without changing its parameters."""
    module.__dict__.pop(_COVERED, None)
    if module.__dict__.pop(_COVER, None) is not None:
        _remove_hooks(module, _cover_pre_hook, _cover_post_hook)
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return
    _remove_hooks(module, _pre_hook, _post_hook)
    for name, m in state.items():
        module.__dict__.pop(name, None)
        for buf in m.buffers:
            delattr(module, buf)


def _remove_hooks(module: nn.Module, pre: object, post: object) -> None:
    # Found by identity rather than through handles, so that this also works on a deepcopy.
    for hooks, hook in ((module._forward_pre_hooks, pre), (module._forward_hooks, post)):
        for key in [k for k, v in hooks.items() if v is hook]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
