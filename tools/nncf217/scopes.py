"""Area ``scopes``: NNCF 2.17's node names, scope selection, statistics and distillation loss.

Run by ``tools/record_nncf.py scopes`` beside NNCF 2.17 (see there). What it records, per seeded
model of ``tests/nncf217_models.py``:

- ``nodes``: every node of NNCF's graph, and the node and module name of each layer magnitude
  sparsity wraps;
- ``cases``: which layers magnitude sparsity and filter pruning compress under a grid of
  ``ignored_scopes`` / ``target_scopes`` (exact node names, names without the operation, ``{re}``
  patterns, module names), or the first line of NNCF's error;
- ``statistics``: NNCF's sparsity figures at level 0.5 and its filter pruning FLOPs, weights and
  filters before pruning;
- ``distillation``: the knowledge distillation loss on a seeded batch after a seeded change of
  the student's weights, with NNCF's teacher in train mode (its default) and in eval mode, and
  what a second read of the loss gives.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import nncf217_models as models
import torch
from torch import nn

SPARSITY = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
PRUNING = {
    "algorithm": "filter_pruning",
    "pruning_init": 0.5,
    "params": {"prune_first_conv": True, "prune_downsample_convs": True},
}

# (model, algorithm key, ignored_scopes, target_scopes)
SCOPE_GRID: list[tuple[str, str, list[str] | None, list[str] | None]] = [
    ("lenet300", "sparsity", ["LeNet300/NNCFLinear[fc1]/linear_0"], None),
    ("lenet300", "sparsity", ["LeNet300/NNCFLinear[fc1]"], None),
    ("lenet300", "sparsity", ["{re}fc[12]"], None),
    ("lenet300", "sparsity", None, ["{re}.*NNCFLinear\\[fc3\\].*"]),
    ("lenet300", "sparsity", None, ["LeNet300/NNCFLinear[fc2]/linear_0"]),
    ("lenet300", "sparsity", ["fc1"], None),
    ("lenet300", "sparsity", ["LeNet300/relu_0"], None),
    ("lenet300", "sparsity", ["LeNet300/NNCFLinear[fc9]/linear_0"], None),
    ("lenet300", "sparsity", ["{re}conv"], None),
    ("lenet300", "sparsity", ["LeNet300/NNCFLinear[fc1]/linear_1"], None),
    ("plain_cnn", "sparsity", ["PlainCNN/NNCFConv2d[conv1]/conv2d_0"], None),
    (
        "plain_cnn",
        "sparsity",
        ["PlainCNN/NNCFConv2d[conv1]/conv2d_0", "PlainCNN/NNCFLinear[fc]/linear_0"],
        None,
    ),
    ("plain_cnn", "sparsity", None, ["{re}conv[23]"]),
    ("plain_cnn", "sparsity", ["PlainCNN/NNCFBatchNorm2d[bn1]/batch_norm_0"], None),
    ("plain_cnn", "sparsity", ["{re}NNCFConv2d\\[conv\\d\\]/conv2d_0$"], None),
    ("plain_cnn", "sparsity", ["{re}^PlainCNN/NNCFLinear"], None),
    (
        "resnet",
        "sparsity",
        ["ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0"],
        None,
    ),
    ("resnet", "sparsity", ["ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]"], None),
    ("resnet", "sparsity", ["{re}.*Sequential\\[layer2\\].*"], None),
    ("resnet", "sparsity", None, ["{re}.*shortcut.*"]),
    ("resnet", "sparsity", ["{re}conv1"], None),
    ("resnet", "sparsity", ["ResNet/Sequential[layer1]/BasicBlock[0]/__add___0"], None),
    ("resnet", "sparsity", ["{re}BasicBlock\\[0\\]/relu_1"], None),
    ("resnet", "sparsity", ["{re}shortcut"], ["{re}layer3"]),
    ("resnet", "sparsity", ["ResNet/Sequential[layer1]"], None),
    ("resnet", "sparsity", ["{re}^ResNet/NNCFConv2d"], None),
    ("resnet", "sparsity", ["layer1.0.conv1"], None),
    ("resnet", "sparsity", ["{re}layer1\\.0\\.conv1"], None),
    ("resnet", "sparsity", None, ["{re}Sequential\\[layer3\\]/BasicBlock\\[0\\]/NNCFConv2d"]),
    ("plain_cnn", "pruning", None, None),
    ("plain_cnn", "pruning", ["PlainCNN/NNCFConv2d[conv2]/conv2d_0"], None),
    ("plain_cnn", "pruning", ["PlainCNN/NNCFConv2d[conv2]"], None),
    ("plain_cnn", "pruning", None, ["{re}conv[23]"]),
    ("plain_cnn", "pruning", ["{re}.*conv3.*"], None),
    ("resnet", "pruning", None, None),
    (
        "resnet",
        "pruning",
        ["ResNet/Sequential[layer2]/BasicBlock[0]/NNCFConv2d[conv1]/conv2d_0"],
        None,
    ),
    ("resnet", "pruning", ["{re}layer3"], None),
    ("resnet", "pruning", None, ["{re}.*Sequential\\[layer2\\].*"]),
    (
        "resnet",
        "pruning",
        ["ResNet/Sequential[layer3]/BasicBlock[0]/Sequential[shortcut]/NNCFConv2d[0]/conv2d_0"],
        None,
    ),
    ("resnet", "pruning", ["{re}conv1"], None),
    ("resnet", "pruning", ["ResNet/Sequential[layer1]/BasicBlock[0]/NNCFConv2d[conv1]"], None),
    ("lenet300", "sparsity", None, ["{re}NNCFLinear"]),
]


def _build(name: str, section: Any, model: nn.Module | None = None, **top: Any) -> Any:
    from nncf import NNCFConfig
    from nncf.torch import create_compressed_model

    model = model if model is not None else models.seeded(name)
    shape = list(models.MODELS[name][1])
    config = NNCFConfig.from_dict(
        {"input_info": {"sample_size": shape}, "compression": section, **top}
    )
    return create_compressed_model(model, config)


def _paths(net: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in net.named_modules()}


def _nodes() -> dict[str, Any]:
    out = {}
    for name in models.MODELS:
        ctrl, net = _build(name, SPARSITY)
        paths = _paths(net)
        graph = net.nncf.get_original_graph()
        out[name] = {
            "graph": sorted(n.node_name for n in graph.get_all_nodes()),
            "layers": {
                paths[id(i.module)]: i.module_node_name for i in ctrl.sparsified_module_info
            },
        }
    return out


def _selected(kind: str, ctrl: Any, net: nn.Module) -> list[str]:
    paths = _paths(net)
    if kind == "sparsity":
        return sorted(paths[id(i.module)] for i in ctrl.sparsified_module_info)
    return sorted({paths[id(m.module)] for m in ctrl.pruned_module_groups_info.get_all_nodes()})


def _cases() -> list[dict[str, Any]]:
    out = []
    for name, kind, ignored, target in SCOPE_GRID:
        section = copy.deepcopy(SPARSITY if kind == "sparsity" else PRUNING)
        if ignored is not None:
            section["ignored_scopes"] = list(ignored)
        if target is not None:
            section["target_scopes"] = list(target)
        case: dict[str, Any] = {
            "model": name,
            "algorithm": section["algorithm"],
            "ignored_scopes": ignored,
            "target_scopes": target,
        }
        try:
            ctrl, net = _build(name, section)
            case["selected"] = _selected(kind, ctrl, net)
        except Exception as e:  # noqa: BLE001 - NNCF's refusal is the recorded result
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        out.append(case)
    return out


def _statistics() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models.MODELS:
        ctrl, net = _build(name, SPARSITY)
        paths = {i.module_node_name: paths_ for i, paths_ in _layer_paths(ctrl, net)}
        stats = ctrl.statistics().magnitude_sparsity.model_statistics
        entry: dict[str, Any] = {
            "sparsity_level": stats.sparsity_level,
            "sparsity_level_for_layers": stats.sparsity_level_for_layers,
            "weight_percentage": {
                paths[s.name]: s.weight_percentage for s in stats.sparsified_layers_summary
            },
        }
        if name != "lenet300":
            ctrl, net = _build(name, {**PRUNING, "pruning_init": 0.0})
            pruned = ctrl.statistics().filter_pruning.model_statistics
            entry.update(
                full_flops=int(pruned.full_flops),
                full_params_num=int(pruned.full_params_num),
                full_filters_num=int(pruned.full_filters_num),
            )
        out[name] = entry
    return out


def _layer_paths(ctrl: Any, net: nn.Module) -> list[tuple[Any, str]]:
    paths = _paths(net)
    return [(i, paths[id(i.module)]) for i in ctrl.sparsified_module_info]


# (type, scale, temperature or None)
KD_GRID: list[tuple[str, float, float | None]] = [
    ("mse", 1.0, None),
    ("mse", 2.5, None),
    ("softmax", 1.0, None),
    ("softmax", 1.0, 4.0),
    ("softmax", 0.5, 2.0),
]


def _perturb(net: nn.Module, names: list[str], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for pname in names:
            p = params[pname]
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _distillation() -> list[dict[str, Any]]:
    out = []
    for name in models.MODELS:
        names = sorted(n for n, _ in models.seeded(name).named_parameters())
        shape = models.MODELS[name][1]
        batch = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(7))
        for kind, scale, temperature in KD_GRID:
            section: dict[str, Any] = {"algorithm": "knowledge_distillation", "type": kind}
            section["scale"] = scale
            if temperature is not None:
                section["temperature"] = temperature
            case: dict[str, Any] = {"model": name, **{k: v for k, v in section.items()}}
            for teacher_mode in ("train", "eval"):
                ctrl, net = _build(name, copy.deepcopy(section))
                _perturb(net, names, seed=3)
                net.train()
                if teacher_mode == "eval":
                    ctrl.loss._kd_loss_handler._kd_original_model.eval()
                net(batch)
                case[f"loss_teacher_{teacher_mode}"] = float(ctrl.loss().detach())
                if teacher_mode == "train":  # a second read, without a forward pass between
                    case["loss_read_again"] = float(ctrl.loss().detach())
            out.append(case)
    return out


def record() -> dict[str, Any]:
    logging.getLogger("nncf").setLevel(logging.ERROR)
    torch.manual_seed(0)
    return {
        "nncf": "2.17.0",
        "nodes": _nodes(),
        "cases": _cases(),
        "statistics": _statistics(),
        "distillation": _distillation(),
    }
