"""What a filter pruning recipe can reach: the share of MACs and params it may remove, and why
each group of coupled channels it leaves whole is left whole, so that no recipe prunes nothing
in silence.

Example:
    >>> from compress.pruning.channel_groups import Excluded
    >>> rows = exclusion_rows([Excluded("conv1", "first conv", "'conv1' is the first conv")])
    >>> rows[0]["would change it"]
    'prune_first_conv: true'
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from compress.pruning.channel_groups import Excluded

__all__ = ["check_reachable", "coverage_warning", "exclusion_rows"]

FLAGS = {
    "first conv": "prune_first_conv: true",
    "downsample conv": "prune_downsample_convs: true",
    "out of scope": "ignored_scopes / target_scopes",
    "rounding": "a smaller round_to",
    "config": "prune_beyond_config: true (then export the 'pruned' file, not save_pretrained)",
    "latency target": "pruning_target or pruning_flops_target in place of the latency target",
}
"""The recipe flag that would bring back a group excluded for each reason."""
_QUIET = {"network output", "single channel"}  # inherent to the model, not worth a warning


def exclusion_rows(excluded: Sequence[Excluded]) -> list[dict[str, Any]]:
    """One row per excluded group (first reason only), for the statistics table."""
    seen: set[str] = set()
    rows = []
    for e in excluded:
        if e.group in seen and e.group:
            continue
        seen.add(e.group)
        rows.append(
            {
                "group": e.group or "(model)",
                "excluded because": e.kind,
                "detail": e.detail,
                "would change it": FLAGS.get(e.kind, ""),
            }
        )
    return rows


def coverage_warning(
    macs_share: float, params_share: float, excluded: Sequence[Excluded]
) -> str | None:
    """The build-time warning: what share filter pruning may remove and what it leaves whole;
    None when nothing is excluded for a reason the user could act on or should know."""
    rows = exclusion_rows(excluded)
    loud = [r for r in rows if r["excluded because"] not in _QUIET]
    if not loud and macs_share + params_share > 0:
        return None
    # nothing prunable at all: the reasons inherent to the model are then the news
    loud = loud or rows
    kinds = Counter(r["excluded because"] for r in loud)
    listed = "; ".join(
        f"{r['group']} ({r['excluded because']}: "
        + (f"{r['would change it']} would include it" if r["would change it"] else r["detail"])
        + ")"
        for r in loud[:8]
    )
    more = f"; and {len(loud) - 8} more" if len(loud) > 8 else ""
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
    return (
        f"filter_pruning can remove at most {macs_share:.1%} of the model's MACs and "
        f"{params_share:.1%} of its params; {len(loud)} groups stay whole ({counts}): "
        f"{listed}{more}"
    )


def check_reachable(path: str, n_groups: int, excluded: Sequence[Excluded]) -> None:
    """A warning naming the flags that would help when the options leave nothing to prune:
    NNCF 2.17 builds such a recipe and trains unpruned, and so does this. A model Torch-Pruning
    cannot trace, or with nothing prunable whatever the options, warns through
    :func:`coverage_warning` only."""
    if n_groups:
        return
    kinds = list(dict.fromkeys(e.kind for e in excluded if e.kind in FLAGS))
    if kinds:
        warnings.warn(
            f"{path}: filter_pruning can prune nothing: every group of coupled channels is "
            f"excluded by the options ({', '.join(kinds)}); set "
            f"{' or '.join(FLAGS[k] for k in kinds)} to prune some. Training goes on "
            "unpruned, as in NNCF 2.17",
            stacklevel=6,
        )
