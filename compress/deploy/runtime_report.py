"""What :func:`compress.deploy.sparse_runtime.to_sparse_runtime` measured and decided, per
layer: a readable table, and a JSON form saved beside exports and shown by ``compress
inspect``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from compress.errors import ConfigError

LayerKind = Literal["linear", "conv1x1"]


@dataclass(frozen=True)
class LayerRuntime:
    """One candidate layer: what was measured and what was decided.

    Times are ``None`` when the layer was never timed (not reached by ``example_inputs``, or
    skipped for the ``reason`` given).
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    speedup: float | None
    converted: bool
    layout: str = "dense"
    reason: str = ""


@dataclass(frozen=True)
class RuntimeReport:
    """What :func:`to_sparse_runtime` measured and converted, per layer.

    ``str(report)`` is a readable table; ``report.to_dict()`` is JSON-serialisable and
    :func:`report_from_dict` turns it back into a report.
    """

    layers: tuple[LayerRuntime, ...]
    min_speedup: float
    sparse_threads: int = 0
    """Threads the sparse kernels run with; 0: the process setting."""

    @property
    def converted(self) -> list[str]:
        """Names of the layers that now run sparse."""
        return [layer.name for layer in self.layers if layer.converted]

    def to_dict(self) -> dict[str, Any]:
        layers = [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers]
        return {
            "min_speedup": self.min_speedup,
            "sparse_threads": self.sparse_threads,
            "layers": layers,
        }

    def __str__(self) -> str:
        header = "| layer | kind | shape | sparsity | dense ms | sparse ms | speed-up | runs as |"
        rows = [header, "|---|---|---|---:|---:|---:|---:|---|"]
        for layer in self.layers:
            runs_as = layer.layout if layer.converted else f"dense ({layer.reason})"
            shape = "x".join(str(d) for d in layer.shape)
            rows.append(
                f"| {layer.name} | {layer.kind} | {shape} | {layer.sparsity:.1%} "
                f"| {_fmt(layer.dense_ms)} | {_fmt(layer.sparse_ms)} "
                f"| {_fmt(layer.speedup, 'x')} | {runs_as} |"
            )
        threads = f"; sparse kernels on {self.sparse_threads} thread(s)" * bool(self.sparse_threads)
        rows.append(
            f"{len(self.converted)} of {len(self.layers)} candidate layers converted "
            f"(min_speedup={self.min_speedup:g}){threads}"
        )
        return "\n".join(rows)


def report_from_dict(d: dict[str, Any]) -> RuntimeReport:
    """Rebuild a :class:`RuntimeReport` from ``report.to_dict()``, e.g. after a JSON round trip.

    Example:
        >>> report_from_dict({"min_speedup": 1.1, "layers": []}).converted
        []
    """
    try:
        layers = tuple(
            LayerRuntime(**{**layer, "shape": tuple(layer["shape"])}) for layer in d["layers"]
        )
        return RuntimeReport(
            layers=layers,
            min_speedup=float(d["min_speedup"]),
            sparse_threads=int(d.get("sparse_threads", 0)),
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"report_from_dict: not a RuntimeReport dict ({err}); expected the output of "
            "RuntimeReport.to_dict() with keys 'min_speedup' and 'layers'"
        ) from None


def _fmt(value: float | None, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
