"""Statistics: per-layer and total sparsity, parameters and MACs, as a table and as numbers."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compress import experts
from compress.analysis.untouched import untouched


@dataclass(frozen=True)
class Statistics:
    """What ``ctrl.statistics()`` returns: ``str()`` is a readable report, ``to_dict()`` numbers."""

    model: Mapping[str, Any]
    algorithms: Sequence[Mapping[str, Any]] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "algorithms": [dict(a) for a in self.algorithms]}

    def __str__(self) -> str:
        parts = []
        for algo in self.algorithms:
            head = f"Statistics of {algo['algorithm']}"
            if "level" in algo:
                head += f" (current level {algo['level']:.4f}"
                head += ", frozen)" if algo.get("frozen") else ")"
            parts.append(head)
            if algo.get("layers"):
                parts.append(table(algo["layers"]))
            if algo.get("summary"):
                parts.append(
                    table(
                        [algo["summary"]]
                        if isinstance(algo["summary"], Mapping)
                        else algo["summary"]
                    )
                )
            if "prunable MACs share" in algo:
                parts.append(
                    f"Removable at most: {algo['prunable MACs share']:.1%} of MACs, "
                    f"{algo['prunable params share']:.1%} of params"
                )
            if algo.get("excluded"):
                parts.append("Groups of coupled channels left whole")
                parts.append(table(algo["excluded"]))
        parts.append("Statistics of the model")
        parts.append(table([{"": k, "value": v} for k, v in self.model.items()]))
        return "\n".join(parts)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain aligned text table; floats in [0, 1] print with 4 decimals."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [
        f"+{line}+",
        "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
        f"+{line}+",
    ]
    for r in cells:
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
    out.append(f"+{line}+")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


def layer_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """MACs of each module (by name) for one forward pass, from torch's FLOP counter.

    Fused mixture-of-experts layers are counted by hand instead: the counter misses their
    grouped matrix products. Such a layer over T tokens costs T * k (experts per token) times
    one expert's weights, listed per fused parameter too (``...experts.gate_up_proj``)."""
    with untouched(model), torch.no_grad(), counting_macs(model) as out:
        model.eval()
        model(*example_inputs)
    return out


@contextmanager
def counting_macs(model: nn.Module) -> Iterator[dict[str, int]]:
    """Counts the MACs of the forward passes of ``model`` run inside the block (as
    :func:`layer_macs` does), into the dict it yields, filled when the block ends without an
    error: the trace of filter pruning counts them in the forward pass it runs anyway."""
    counter = FlopCounterMode(display=False)
    tokens: dict[str, int] = {}
    out: dict[str, int] = {}
    handles = [
        module.register_forward_hook(functools.partial(_count_tokens, tokens, name))
        for name, module in experts.expert_modules(model)
    ]
    try:
        with counter:
            yield out
    finally:
        for handle in handles:
            handle.remove()
    out |= _counted(model, counter, tokens)


def _counted(
    model: nn.Module, counter: FlopCounterMode, tokens: Mapping[str, int]
) -> dict[str, int]:
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, counts in counter.get_flop_counts().items():
        name = key[len(root) + 1 :] if key.startswith(root + ".") else ("" if key == root else key)
        out[name] = int(sum(counts.values())) // 2
    for name, n in tokens.items():
        per_param = experts.routed_macs(model.get_submodule(name), n)
        extra = sum(per_param.values()) - out.get(name, 0)  # whatever the counter saw, replaced
        parts = name.split(".")
        for prefix in ["", "Global"] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if prefix in out or prefix == name or prefix == "":
                out[prefix] = out.get(prefix, 0) + extra
        out |= {f"{name}.{p}": m for p, m in per_param.items()}
    return out


def _count_tokens(
    tokens: dict[str, int], name: str, module: nn.Module, args: Any, output: Any
) -> None:
    """Forward hook of an experts module: adds the tokens its input holds."""
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.dim() > 0:
        tokens[name] = tokens.get(name, 0) + hidden.numel() // hidden.shape[-1]


def model_summary(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | None,
    weights: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Totals of the model. ``weights`` maps layer names to the weights as the forward pass sees
    them (masked); MACs of a layer after sparsity scale with its weight density."""
    # The model's own parameters: those in its state_dict (RB logits are not).
    own = {id(t) for t in model.state_dict(keep_vars=True).values()}
    params = sum(p.numel() for p in model.parameters() if id(p) in own)
    zero = sum(int((w == 0).sum()) for w in weights.values())
    n_weights = sum(w.numel() for w in weights.values())
    out: dict[str, Any] = {
        "params": params,
        NNCF_PARAMS: conv_linear_weights(model),
        "compressed layers": len(weights),
        "weights in compressed layers": n_weights,
        "zero weights": zero,
        "sparsity of compressed layers": zero / n_weights if n_weights else 0.0,
        "sparsity of the model": zero / params if params else 0.0,
    }
    if example_inputs is not None:
        macs = layer_macs(model, example_inputs)
        total = macs.get("", sum(macs.values()))
        saved = 0.0
        for name, w in weights.items():
            saved += macs.get(name, 0) * float((w == 0).sum()) / max(w.numel(), 1)
        out["MACs"] = total
        out["nonzero MACs"] = int(total - saved)
        # NNCF reports FLOPs, counting a multiply-add as two operations
        out["FLOPs (2 x MACs)"] = 2 * total
        out["nonzero FLOPs (2 x MACs)"] = 2 * int(total - saved)
    return out


# NNCF 2.17's "MParams" (its filter pruning statistics): the weights of conv and linear layers,
# without biases and norms, where "params" here counts every parameter of the model.
NNCF_PARAMS = "conv/linear weights (NNCF's params)"
_CONV_LINEAR = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def conv_linear_weights(model: nn.Module) -> int:
    """The weights of the model's conv and linear layers, each shared weight once: the figure
    NNCF reports as the model's parameters."""
    seen = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, _CONV_LINEAR) and isinstance(m.weight, torch.Tensor)
    }
    return sum(seen.values())
