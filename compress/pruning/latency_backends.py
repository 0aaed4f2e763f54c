"""The runtime a latency table is measured in (``latency_backend``): PyTorch eager, ONNX Runtime
or OpenVINO.

A latency target is only worth what its table predicts in the runtime the model will run in:
the same layer at the same width can be fast in one and slow in another (oneDNN's blocking,
fused BatchNorm and activations, other convolution algorithms). For ``"onnxruntime"`` and
``"openvino"`` each timed layer call of :func:`compress.pruning.latency.measure_table` (a conv or
linear layer on a fixed input) is rebuilt as a one-node graph of that runtime, with the layer's
weights, strides, padding, dilation and groups, and the whole model is converted once (through
``torch.onnx.export`` or ``torch.export`` + ``openvino.convert_model``). Both run on
``torch.get_num_threads()`` threads, OpenVINO in float32 (its CPU plugin would compute in
bfloat16 on CPUs that have it). The layers are built directly, not exported, because a table
times hundreds of layer variants and an export takes seconds.

Example:
    >>> import functools, torch
    >>> layer = torch.nn.Conv2d(3, 8, 3, padding=1)
    >>> call = functools.partial(layer, torch.randn(2, 3, 8, 8))
    >>> run = runtime_call("onnxruntime", call)  # a one-node ONNX graph in an ORT session
    >>> run()[0].shape
    (2, 8, 8, 8)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from compress.analysis.node_kinds import is_transposed_linear
from compress.errors import CompressError, ConfigError

__all__ = ["BACKENDS", "Backend", "check_backend", "runtime_call"]

Backend = Literal["torch", "onnxruntime", "openvino"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnxruntime", "openvino")
_PACKAGES = {"onnxruntime": "onnxruntime onnx", "openvino": "lightning-compress[openvino]"}


def check_backend(backend: str) -> None:
    """A ConfigError unless ``backend`` is one of ``BACKENDS`` and its package imports."""
    if backend not in BACKENDS:
        raise ConfigError(f"latency_backend: {backend!r} is not one of {list(BACKENDS)}")
    if backend == "torch":
        return
    try:
        if backend == "openvino":
            import openvino  # noqa: F401
        else:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"latency_backend {backend!r} needs its runtime ({e}); install it with "
            f"`pip install {_PACKAGES[backend]}`"
        ) from None


def runtime_call(backend: Backend, call: functools.partial[Any]) -> Callable[[], object]:
    """``call`` (a layer or model on its inputs) as a call of the same computation in
    ``backend``; ``call`` itself for ``"torch"``."""
    if backend == "torch":
        return call
    module, inputs = call.func, tuple(call.args)
    assert isinstance(module, nn.Module) and not call.keywords
    if _is_layer(module):
        (x,) = inputs
        return _layer_openvino(module, x) if backend == "openvino" else _layer_onnx(module, x)
    try:
        return (
            _model_openvino(module, inputs)
            if backend == "openvino"
            else _model_onnx(module, inputs)
        )
    except Exception as e:  # the exporters raise many kinds
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CompressError(
            f"latency_backend {backend!r}: the model does not convert ({text}); measure the "
            "latency table in 'torch'"
        ) from None


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_transposed_linear(m)


def _conv_attrs(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> dict[str, list[int]]:
    """Strides, dilations and explicit paddings (begin, end) of a convolution on ``x``."""
    k, s, d = list(m.kernel_size), list(m.stride), list(m.dilation)
    if m.padding == "valid":
        pads = [0] * len(k)
        return {"strides": s, "dilations": d, "begin": pads, "end": pads}
    if m.padding == "same":  # stride 1: the total padding is dilation * (kernel - 1)
        total = [di * (ki - 1) for di, ki in zip(d, k, strict=True)]
        begin = [t // 2 for t in total]
        return {
            "strides": s,
            "dilations": d,
            "begin": begin,
            "end": [t - b for t, b in zip(total, begin, strict=True)],
        }
    pads = [int(p) for p in m.padding]  # type: ignore[union-attr]
    return {"strides": s, "dilations": d, "begin": pads, "end": pads}


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _layer_openvino(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    import openvino as ov
    import openvino.opset13 as ops

    data = ops.parameter(list(x.shape), np.float32)
    weight, bias = _numpy(m.weight), _numpy(getattr(m, "bias", None))  # type: ignore[arg-type]
    assert weight is not None
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        a = _conv_attrs(m, x)
        if m.groups == 1:
            y = ops.convolution(data, weight, a["strides"], a["begin"], a["end"], a["dilations"])
        else:  # [out, in / groups, k...] -> [groups, out / groups, in / groups, k...]
            w = weight.reshape(m.groups, -1, *weight.shape[1:])
            y = ops.group_convolution(data, w, a["strides"], a["begin"], a["end"], a["dilations"])
        if bias is not None:
            y = ops.add(y, bias.reshape(1, -1, *[1] * (x.dim() - 2)))
    else:  # Linear stores its weight (out, in); transformers' Conv1D (in, out)
        y = ops.matmul(data, weight, False, not is_transposed_linear(m))
        if bias is not None:
            y = ops.add(y, bias)
    compiled = ov.Core().compile_model(ov.Model([y], [data]), "CPU", _ov_config())
    request, a_in = compiled.create_infer_request(), x.detach().numpy()
    return lambda: request.infer({0: a_in})


def _ov_config() -> dict[str, Any]:
    return {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }


def _layer_onnx(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = _numpy(m.weight), _numpy(getattr(m, "bias", None))  # type: ignore[arg-type]
    assert weight is not None
    inits = [numpy_helper.from_array(weight, "w")]
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        a = _conv_attrs(m, x)
        names = ["x", "w"]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "b"))
            names.append("b")
        node = helper.make_node(
            "Conv",
            names,
            ["y"],
            group=m.groups,
            kernel_shape=list(m.kernel_size),
            strides=a["strides"],
            dilations=a["dilations"],
            pads=a["begin"] + a["end"],
        )
        nodes = [node]
    else:
        w = weight if is_transposed_linear(m) else np.ascontiguousarray(weight.T)  # (in, out)
        inits = [numpy_helper.from_array(w, "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if bias is None else "xw"])]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias, "b"))
            nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _ort_call(model.SerializeToString(), {"x": x.detach().numpy()})


def _ort_call(model: bytes, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feed)


def _model_openvino(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    import openvino as ov

    program = torch.export.export(model, inputs)
    compiled = ov.Core().compile_model(ov.convert_model(program), "CPU", _ov_config())
    request, arrays = compiled.create_infer_request(), [t.detach().numpy() for t in inputs]
    return lambda: request.infer(dict(enumerate(arrays)))


def _model_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    assert program is not None
    proto = program.model_proto
    feed = {i.name: t.detach().numpy() for i, t in zip(proto.graph.input, inputs, strict=True)}
    return _ort_call(proto.SerializeToString(), feed)
