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
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ConfigError(f"{path}: the range '{lo}-{hi}' is reversed; write '{hi}-{lo}'")
        out.update(range(lo, hi + 1))
    return sorted(out)
