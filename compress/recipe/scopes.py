"""How a recipe names layers and channels: NNCF's ignored_scopes and target_scopes, channel lists.

A scope is a module name as in ``model.named_modules()`` (``layer1.0.conv1``), a shell glob
(``layer1.*``) or a regular expression with NNCF's ``{re}`` prefix (``{re}.*conv[12]$``).

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    >>> [n for n, _ in select(model, (nn.Linear,), ignored=["2"])]
    ['0']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

from torch import nn

from compress.errors import ConfigError


def _as_list(scopes: str | Sequence[str] | None) -> list[str]:
    if scopes is None:
        return []
    return [scopes] if isinstance(scopes, str) else list(scopes)


def matches(scope: str, name: str) -> bool:
    if scope.startswith("{re}"):
        return re.fullmatch(scope[4:], name) is not None
    return fnmatch.fnmatchcase(name, scope)


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
    names = [n for n, _ in model.named_modules()]
    if validate:
        for key, scopes in (("ignored_scopes", ignored_l), ("target_scopes", target_l)):
            for scope in scopes:
                if scope.startswith("{re}"):
                    try:
                        re.compile(scope[4:])
                    except re.error as e:
                        raise ConfigError(
                            f"{path}.{key}: {scope!r} is not a valid regex: {e}"
                        ) from None
                if not any(matches(scope, n) for n in names):
                    raise ConfigError(
                        f"{path}.{key}: {scope!r} matches no module of the model; module "
                        f"names look like {names[1:4]} (set validate_scopes: false to allow this)"
                    )
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if target_l and not any(matches(s, name) for s in target_l):
            continue
        if any(matches(s, name) for s in ignored_l):
            continue
        out.append((name, module))
    return out


# Quantifiers without an upper bound that one regex scope may hold: module names are short, but
# k of them in a row backtrack in O(len(name) ** k).
MAX_UNBOUNDED = 3
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}


def check_regex(pattern: str, where: str) -> None:
    """Refuses a ``{re}`` scope that does not compile or could backtrack for hours.

    The check is static, on the parsed pattern: a quantifier without an upper bound whose body
    has no fixed length (``(a+)+``, ``(\\w+\\.?)+``, ``(a|aa)+``: exponential), or more than
    ``MAX_UNBOUNDED`` unbounded quantifiers in one pattern (polynomial of that degree).

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
