"""How a recipe names layers and channels: NNCF's ignored_scopes and target_scopes, channel lists.

A scope is one of:

- a module name as in ``model.named_modules()`` (``layer1.0.conv1``) or a shell glob of one
  (``layer1.*``);
- NNCF's name of the layer's graph node, ``ResNet/Sequential[layer1]/BasicBlock[0]/
  NNCFConv2d[conv1]/conv2d_0``, or of its scope without the operation (``.../NNCFConv2d[conv1]``,
  which also names every layer inside a container: ``ResNet/Sequential[layer1]``);
- a regular expression with NNCF's ``{re}`` prefix. As in NNCF it is searched for in the node
  name (``{re}.*NNCFConv2d\\[conv1\\]``, ``{re}fc``); it also selects a module whose whole name
  it matches (``{re}layer[12]\\..*conv1``). It is matched with RE2 (:func:`compile_regex`),
  which never backtracks: time linear in the name, whatever the pattern.

NNCF takes its names from a trace; here they come from the module tree, which gives the same
names for layers: the model's class, then ``Class[attribute]`` per level, with NNCF's wrapper
names for the layer types it wraps (``NNCFConv2d``, ``NNCFLinear``, ``NNCFBatchNorm2d``, ...) and
the operation the layer's forward runs, first call (``conv2d_0``, ``linear_0``).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> [n for n, _ in select(model, (nn.Linear,), ignored=["2"])]
    ['0']
    >>> [n for n, _ in select(model, (nn.Linear,), ignored=["Sequential/NNCFLinear[0]/linear_0"])]
    ['2']
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import re2
import torch
from torch import nn

from compress.errors import ConfigError
from compress.experts import expert_params

# The layer types NNCF 2.17 replaces by its own (nncf/torch/layers.py: NNCF_MODULES_DICT): the
# wrapper's class name in node names, and the operation the layer's forward runs. Only these
# exact types are wrapped; a subclass keeps its own class name.
NNCF_WRAPPERS: dict[type[nn.Module], str] = {
    nn.Conv1d: "NNCFConv1d",
    nn.Conv2d: "NNCFConv2d",
    nn.Conv3d: "NNCFConv3d",
    nn.Linear: "NNCFLinear",
    nn.BatchNorm1d: "NNCFBatchNorm1d",
    nn.BatchNorm2d: "NNCFBatchNorm2d",
    nn.BatchNorm3d: "NNCFBatchNorm3d",
    nn.GroupNorm: "NNCFGroupNorm",
    nn.LayerNorm: "NNCFLayerNorm",
    nn.ConvTranspose1d: "NNCFConvTranspose1d",
    nn.ConvTranspose2d: "NNCFConvTranspose2d",
    nn.ConvTranspose3d: "NNCFConvTranspose3d",
    nn.Embedding: "NNCFEmbedding",
    nn.EmbeddingBag: "NNCFEmbeddingBag",
}
# Transposed convs first: isinstance picks the first entry, and they are not Conv subclasses
# anyway; BatchNorm's three types share one operation.
NNCF_OPS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ConvTranspose1d, "conv_transpose1d"),
    (nn.ConvTranspose2d, "conv_transpose2d"),
    (nn.ConvTranspose3d, "conv_transpose3d"),
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Conv3d, "conv3d"),
    (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding_bag"),
)


@dataclass(frozen=True)
class Names:
    """The names one module goes by: its module name, NNCF's scope and NNCF's node name (the
    scope plus the operation, for the layers whose operation is known; else None). A fused
    expert parameter's names carry its module's name as ``owner``: a scope naming the module
    names its parameters too."""

    path: str
    scope: str
    node: str | None
    owner: str = ""


def nncf_names(model: nn.Module) -> list[tuple[Names, nn.Module]]:
    """Every module of ``model`` (as ``named_modules`` lists them) with its NNCF names; a module
    holding fused expert parameters is listed again under each of their names
    (``model.layers.0.mlp.experts.gate_up_proj``), as sparsity masks them.

    Example:
        >>> from torch import nn
        >>> [n.node for n, _ in nncf_names(nn.Sequential(nn.Conv2d(1, 1, 1)))]
        [None, 'Sequential/NNCFConv2d[0]/conv2d_0']
    """
    scopes = {"": type(model).__name__}
    for parent_path, parent in model.named_modules():
        for attr, child in parent.named_children():
            path = f"{parent_path}.{attr}" if parent_path else attr
            if path not in scopes:
                scopes[path] = f"{scopes[parent_path]}/{_class_name(child)}[{attr}]"
    out = []
    for path, module in model.named_modules():
        op = _op(module)
        scope = scopes[path]
        out.append((Names(path, scope, f"{scope}/{op}_0" if op else None), module))
        # a fused mixture-of-experts parameter is named as a layer of its own
        for param in expert_params(module):
            out.append((Names(f"{path}.{param}", f"{scope}/{param}", None, path), module))
    return out


def _class_name(module: nn.Module) -> str:
    return NNCF_WRAPPERS.get(type(module), type(module).__name__)


def _op(module: nn.Module) -> str | None:
    return next((op for kind, op in NNCF_OPS if isinstance(module, kind)), None)


def _as_list(scopes: str | Sequence[str] | None) -> list[str]:
    if scopes is None:
        return []
    return [scopes] if isinstance(scopes, str) else list(scopes)


def matches(scope: str, name: str | Names) -> bool:
    """Whether ``scope`` names the module ``name`` (a module name, or all of a module's names)."""
    names = name if isinstance(name, Names) else Names(name, "", None)
    if names.owner and matches(scope, Names(names.owner, "", None)):
        return True
    if scope.startswith("{re}"):
        pattern = compile_regex(scope[4:], "scope")
        if pattern.fullmatch(names.path) is not None:
            return True
        return bool(names.scope) and pattern.search(names.node or names.scope) is not None
    if "/" in scope:
        if not names.scope:
            return False
        if names.scope == scope or names.scope.startswith(scope + "/"):
            return True  # the module's scope, or a container holding it
        return scope == names.node
    return fnmatch.fnmatchcase(names.path, scope)


# Operations that are not layers and often have nodes of their own in NNCF's graph: a '{re}'
# scope that matches one of them under some module is accepted, as NNCF accepts it (it selects
# no layer there either).
OTHER_OPS = (
    "relu",
    "relu_",
    "__add__",
    "__iadd__",
    "__mul__",
    "cat",
    "flatten",
    "view",
    "reshape",
    "mean",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "interpolate",
    "dropout",
    "sigmoid",
    "softmax",
    "matmul",
    "__getitem__",
    "silu",
    "gelu",
    "hardswish",
    "hardtanh",
    "tanh",
    "pad",
    "chunk",
    "transpose",
    "permute",
)


def _names_other_op(scope: str, names: list[Names]) -> bool:
    """A node name NNCF's graph may hold besides the layers': an operation that is not a module
    (``ResNet/Sequential[layer1]/BasicBlock[0]/__add___0``, ``ResNet/relu_0``) inside a module
    the model has (not a layer: a layer's scope holds its own operation only). It selects no
    layer, in NNCF as here."""
    if scope.startswith("{re}"):
        pattern = compile_regex(scope[4:], "scope")
        return any(
            pattern.search(f"{n.scope}/{op}_{i}")
            for n in names
            if n.node is None
            for op in OTHER_OPS
            for i in range(10)
        )
    head, _, op_call = scope.rpartition("/")
    match = re.fullmatch(r"(\w+?)_(\d+)", op_call)
    if match is None or not any(n.scope == head and n.node is None for n in names):
        return False
    op = match[1]
    return any(hasattr(space, op) for space in (torch.Tensor, torch.nn.functional, torch))


def select(
    model: nn.Module,
    kinds: tuple[type[nn.Module], ...],
    *,
    ignored: str | Sequence[str] | None = None,
    target: str | Sequence[str] | None = None,
    validate: bool = True,
    path: str = "compression",
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of the given kinds that the scopes allow, in model order."""
    ignored_l, target_l = _as_list(ignored), _as_list(target)
    named = nncf_names(model)
    if validate:
        names = [n for n, _ in named]
        for key, scopes in (("ignored_scopes", ignored_l), ("target_scopes", target_l)):
            for scope in scopes:
                if scope.startswith("{re}"):
                    check_regex(scope[4:], f"{path}.{key}")
                if not any(matches(scope, n) for n in names) and not _names_other_op(scope, names):
                    raise ConfigError(f"{path}.{key}: {unmatched(scope, names)}")
    out = []
    for own, module in named:
        if not isinstance(module, kinds):
            continue
        if target_l and not any(matches(s, own) for s in target_l):
            continue
        if any(matches(s, own) for s in ignored_l):
            continue
        out.append((own.path, module))
    return out


def unmatched(scope: str, names: list[Names]) -> str:
    """What a scope that matches no module is told: the closest names, in the form it used."""
    nncf = "/" in scope or scope.startswith("{re}")
    candidates = [n.node or n.scope for n in names if n.path] if nncf else [n.path for n in names]
    close = difflib.get_close_matches(scope.removeprefix("{re}"), candidates, n=3, cutoff=0.5)
    layer = next((n for n in names if n.node and n.path), names[-1])
    hint = f"closest: {close}" if close else f"names look like {candidates[:3]}"
    return (
        f"{scope!r} matches no module of the model; {hint}. A scope is a module name "
        f"({layer.path!r}), a glob of one, NNCF's node name ({layer.node or layer.scope!r}, "
        "with or without the operation) or a '{re}' regex of either "
        "(set validate_scopes: false to allow this)"
    )


# Quantifiers without an upper bound that one regex scope may hold: module names are short, but
# k of them in a row backtrack in O(len(name) ** k).
MAX_UNBOUNDED = 3
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}


def check_regex(pattern: str, where: str) -> None:
    """Refuses a ``{re}`` scope that does not compile, in Python's ``re`` (NNCF's) and in RE2.

    Scopes are matched with RE2 (:func:`compile_regex`), which cannot backtrack. Patterns that
    backtrack for hours in ``re`` are still refused first, from the parsed pattern, with a
    message saying what to write instead (they would work here but not in NNCF): a quantifier
    without an upper bound whose body has no fixed length (``(a+)+``, ``(\\w+\\.?)+``,
    ``(a|aa)+``: exponential), or more than ``MAX_UNBOUNDED`` unbounded quantifiers.

    Example:
        >>> check_regex("layer[0-9]+\\..*conv", "target_scopes")
        >>> check_regex("(a+)+$", "target_scopes")
        Traceback (most recent call last):
        ...
        compress.errors.ConfigError: target_scopes: '{re}(a+)+$' repeats a part of variable ...
    """
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{where}: '{{re}}{pattern}' is not a valid regex: {e}") from None
    nested, unbounded = _scan(list(parsed))
    if nested:
        raise ConfigError(
            f"{where}: '{{re}}{pattern}' repeats a part of variable length without bound,"
            " which can backtrack for hours on a long name; match the names with a glob "
            "('encoder.*_fc') or a regex without nested quantifiers ('[\\w.]+_fc$')"
        )
    if unbounded > MAX_UNBOUNDED:
        raise ConfigError(
            f"{where}: '{{re}}{pattern}' has {unbounded} unbounded quantifiers ('*', '+', "
            f"'{{n,}}'); at most {MAX_UNBOUNDED}, so that matching stays fast"
        )
    compile_regex(pattern, where)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # else RE2 prints each refused pattern to stderr
# Python spellings that RE2 reads otherwise (escapes and classes are matched whole, so that a
# '\\Z' or '{,2}' inside them stays as written).
_TOKENS = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|\{,(\d*)\}", re.DOTALL)


def compile_regex(pattern: str, where: str) -> Any:
    """``pattern`` compiled by RE2 (cached), which matches in time linear in the name.

    It matches as Python's ``re`` does on ASCII names (``\\w``, ``\\d`` and ``\\b`` are ASCII in
    RE2); what RE2 cannot do (backreferences, lookarounds, counts above 1000) is a
    ``ConfigError`` naming ``where``, the pattern and what to write instead.

    Example:
        >>> bool(compile_regex("(.|.)*Z", "target_scopes").search("layer1.0.conv1" * 20))
        False
        >>> compile_regex("conv(?!1)", "ignored_scopes")
        Traceback (most recent call last):
        ...
        compress.errors.ConfigError: ignored_scopes: '{re}conv(?!1)' uses a lookaround ...
    """
    try:
        return _compiled(pattern)
    except re2.error as e:
        error = e.args[0].decode() if isinstance(e.args[0], bytes) else str(e)
        raise ConfigError(f"{where}: '{{re}}{pattern}' {_re2_hint(error)}") from None


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    def spelled(m: re.Match[str]) -> str:
        if m[0].startswith("["):
            if "[:" in re.sub(r"\\.", "", m[0][1:]):
                raise re2.error(b"POSIX class")
            return m[0]
        if m[0] == "\\Z":
            return "\\z"
        return m[0] if m[1] is None else f"{{0,{m[1]}}}"

    return re2.compile(_TOKENS.sub(spelled, pattern), _RE2_OPTIONS)


def _re2_hint(error: str) -> str:
    if error == "POSIX class":
        return (
            "holds '[:' in a class, a POSIX class in RE2 but those characters in Python's re;"
            " write the characters out ('[a-zA-Z]') or escape the '[' ('[\\[:]')"
        )
    if "repetition size" in error:
        return (
            f"repeats more than RE2 allows ({error}): counts up to 1000, nested counts "
            "multiplied; write a smaller count, or '*' (matched in linear time)"
        )
    if re.search(r"escape sequence: \\[1-9]|\(\?P$", error):
        return (
            f"refers back to a group ({error}), which needs a backtracking matcher; "
            "write the group's text again, or use a glob"
        )
    if re.search(r"\(\?<?[=!]", error):
        return (
            f"uses a lookaround ({error}), which needs a backtracking matcher; name the "
            "layers to keep in target_scopes and those to leave out in ignored_scopes"
        )
    if "(?>" in error or re.search(r"operator: [*+?]\+", error):
        return (
            f"holds an atomic group or a possessive quantifier ({error}); drop it: "
            "RE2 never backtracks ('a+' for 'a++')"
        )
    return (
        f"is not supported by RE2, which scopes are matched with ({error}); "
        "see https://github.com/google/re2/wiki/Syntax"
    )


def _scan(items: list[Any]) -> tuple[bool, int]:
    """(whether an unbounded repeat has a variable-length body, unbounded repeats)."""
    nested, count = False, 0
    for op, av in items:
        subs: list[Any] = []
        if op in _REPEATS:
            _, hi, body = av
            if hi == sre_constants.MAXREPEAT:
                count += 1
                low, high = body.getwidth()
                nested = nested or low != high  # (a+)+, (a|aa)+: many ways to split a name
            subs = [body]
        elif op == sre_constants.SUBPATTERN:
            subs = [av[-1]]
        elif op == sre_constants.BRANCH:
            subs = list(av[1])
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            subs = [av[1]]
        elif op == sre_constants.ATOMIC_GROUP:
            subs = [av]
        elif op == sre_constants.GROUPREF_EXISTS:
            subs = [b for b in av[1:] if b is not None]
        for sub in subs:
            n, c = _scan(list(sub))
            nested, count = nested or n, count + c
    return nested, count


def check_scopes(scopes: str | Sequence[str] | None, where: str) -> None:
    """Every ``{re}`` scope compiles and is safe to match (see :func:`check_regex`)."""
    for scope in _as_list(scopes):
        if scope.startswith("{re}"):
            check_regex(scope[4:], where)


MAX_CHANNEL = 2**20


def parse_channels(text: str, path: str) -> list[int]:
    """NetsPresso's channel list, sorted and without repeats.

    Example:
        >>> parse_channels("105, 8, 9, 11-13", "prune_channels")
        [8, 9, 11, 12, 13, 105]
    """
    out: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ConfigError(
                f"{path}: {part.strip()!r} is not a channel index or range; "
                'write them as "105, 8, 9, 11-13"'
            )
        if max(len(match[1]), len(match[2] or "")) > 7 or int(match[2] or match[1]) >= MAX_CHANNEL:
            raise ConfigError(
                f"{path}: {part.strip()!r} names a channel beyond {MAX_CHANNEL - 1}, more than "
                "any layer has; give the indices of the layer's channels"
            )
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ConfigError(f"{path}: the range '{lo}-{hi}' is reversed; write '{hi}-{lo}'")
        out.update(range(lo, hi + 1))
    return sorted(out)
