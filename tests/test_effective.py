"""Effective sparsity on hand-built networks whose answers are counted by hand.

Every network starts with all weights (and biases) equal to one, so the only zeros are the ones
a test writes, and every count in an assertion can be checked on paper.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

import pytest
import torch
from conftest import BasicBlock
from torch import nn

from compress import masks
from compress.analysis.effective import active_weights
from compress.analysis.effective_report import sparsity_report

M = TypeVar("M", bound=nn.Module)


def ones_(model: M) -> M:
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(1.0)
    return model


def counts(model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, tuple]:
    """{layer: (params, zeros, inactive)} plus "total"."""
    layers = sparsity_report(model, example_inputs).layers
    out = {layer.name: (layer.params, layer.zeros, layer.inactive) for layer in layers}
    total = tuple(sum(v[i] for v in out.values()) for i in range(3))
    return {**out, "total": total}


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return ones_(nn.Sequential(*layers[:-1]))


def test_dense_model_has_no_sparsity() -> None:
    report = sparsity_report(mlp(784, 300, 100, 10))
    assert report.to_dict()["direct_sparsity"] == 0.0
    assert report.to_dict()["effective_sparsity"] == 0.0
    assert report.params == 784 * 300 + 300 * 100 + 100 * 10


def test_a_single_layer_model_is_its_own_path() -> None:
    layer = ones_(nn.Linear(3, 2))
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert counts(layer) == {"weight": (6, 1, 1), "total": (6, 1, 1)}


def test_unit_cut_off_from_input_idles_its_outgoing_column() -> None:
    net = mlp(3, 4, 2)  # 0.weight (4, 3), 2.weight (2, 4)
    with torch.no_grad():
        net[0].weight[1] = 0.0  # hidden unit 1: no incoming weight, but bias 1.0
    assert net[0].bias[1] == 1.0
    assert counts(net) == {"0.weight": (12, 3, 3), "2.weight": (8, 0, 2), "total": (20, 3, 5)}
    assert active_weights(net)["2.weight"][:, 1].tolist() == [False, False]


def test_unit_cut_off_from_output_idles_its_incoming_row() -> None:
    net = mlp(3, 4, 2)
    with torch.no_grad():
        net[2].weight[:, 2] = 0.0  # hidden unit 2 feeds nothing
    assert counts(net) == {"0.weight": (12, 0, 3), "2.weight": (8, 2, 2), "total": (20, 2, 5)}
    assert active_weights(net)["0.weight"][2].tolist() == [False, False, False]


def test_chain_reaction_over_three_layers_reaches_the_fixpoint() -> None:
    net = mlp(2, 3, 3, 2)  # 0: (3, 2), 2: (3, 3), 4: (2, 3)
    with torch.no_grad():
        net[0].weight[0] = 0.0  # h1_0 dead from the input ...
        net[2].weight[0, 1:] = 0.0  # ... and h2_0 hears only h1_0, so it dies too
        net[4].weight[:, 2] = 0.0  # h2_2 reaches no output ...
        net[2].weight[1, 2] = 0.0  # ... and h1_2 feeds only h2_2, so it is idle too
    active = active_weights(net)
    # 0.weight: row 0 zero, row 2 idle (h1_2 reaches nothing) -> only row 1 active.
    assert active["0.weight"].tolist() == [[False, False], [True, True], [False, False]]
    # 2.weight: only h1_1 -> h2_1 lies on an input-output path.
    assert active["2.weight"].sum() == 1 and active["2.weight"][1, 1]
    # 4.weight: column 0 (dead h2_0) and column 2 (zero) -> only column 1.
    assert active["4.weight"].tolist() == [[False, True, False], [False, True, False]]
    assert counts(net)["total"] == (21, 7, 16)
    report = sparsity_report(net)
    assert report.direct_sparsity == 7 / 21
    assert report.effective_sparsity == 16 / 21


class TwoConvs(nn.Module):
    def __init__(self, groups: int = 1, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(3, 2, 3)
        ones_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_conv_channel_with_all_zero_filters_idles_next_conv_slices() -> None:
    net = TwoConvs()
    with torch.no_grad():
        net.conv1.weight[1] = 0.0  # channel 1: nothing from the input
        net.conv2.weight[:, 2] = 0.0  # channel 2: read by nobody
        net.conv2.weight[0, 0, 0, 0] = 0.0  # one kernel element: the connection still exists
    assert counts(net) == {
        "conv1.weight": (27, 9, 18),  # filters 1 (zero) and 2 (unread)
        "conv2.weight": (54, 19, 37),  # slices [:, 1] and [:, 2] plus the single zero
        "total": (81, 28, 55),
    }
    assert active_weights(net)["conv2.weight"][0, 0].sum() == 8


def test_batchnorm_beta_does_not_revive_a_dead_channel() -> None:
    net = TwoConvs(bn=True).eval()
    with torch.no_grad():
        net.conv1.weight[0] = 0.0
    assert net.bn.bias[0] == 1.0  # the channel outputs a constant, carrying no input
    assert counts(net)["conv2.weight"] == (54, 0, 18)


def test_depthwise_conv_keeps_groups_apart() -> None:
    net = ones_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(2, 1, 3)))
    with torch.no_grad():
        net[0].weight[0] = 0.0
    assert counts(net) == {
        "0.weight": (18, 9, 9),
        "1.weight": (18, 0, 9),  # depthwise filter 0 reads the dead channel 0 only
        "2.weight": (18, 0, 9),
        "total": (54, 9, 27),
    }


class Residual(nn.Module):
    """h = stem(x); y = b(a(h)) (+ h); out = head(y)."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.stem, self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        ones_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = self.b(torch.relu(self.a(h)))
        return self.head(torch.relu(y + h if self.skip else y))


@pytest.mark.parametrize(("skip", "inactive"), [(True, 3), (False, 4)])
def test_residual_add_keeps_alive_what_the_branch_cuts_from_the_input(
    skip: bool, inactive: int
) -> None:
    net = Residual(skip)
    with torch.no_grad():
        net.b.weight[0] = 0.0  # the branch's channel 0 hears nothing
    # With the skip, y_0 still hears h_0, so head[0, 0] stays active.
    assert counts(net)["head.weight"] == (3, 0, inactive - 3)
    assert counts(net)["total"] == (2 * 3 + 9 + 9 + 3, 3, inactive)


@pytest.mark.parametrize(("skip", "inactive"), [(True, 3), (False, 5)])
def test_residual_add_keeps_alive_what_the_branch_cuts_from_the_output(
    skip: bool, inactive: int
) -> None:
    net = Residual(skip)
    with torch.no_grad():
        net.a.weight[:, 0] = 0.0  # the branch ignores h_0
    # With the skip, h_0 still reaches the head, so stem row 0 (2 weights) stays active.
    assert counts(net)["stem.weight"] == (6, 0, inactive - 3)
    assert counts(net)["total"] == (27, 3, inactive)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fa, self.fb, self.head = nn.Linear(2, 2), nn.Linear(2, 3), nn.Linear(5, 1)
        ones_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.fa(x)), torch.relu(self.fb(x))], dim=1))


@pytest.mark.parametrize("example_inputs", [None, torch.ones(1, 2)])
def test_concat_places_channels_at_offsets(example_inputs: torch.Tensor | None) -> None:
    net = Concat()
    with torch.no_grad():
        net.fa.weight[1] = 0.0  # concat channel 1 is dead ...
        net.head.weight[0, 3] = 0.0  # ... and concat channel 3 = fb unit 1 is unread
    active = active_weights(net, example_inputs)
    assert active["head.weight"].tolist() == [[True, False, True, False, True]]
    assert active["fb.weight"].tolist() == [[True, True], [False, False], [True, True]]
    assert counts(net, example_inputs) == {
        "fa.weight": (4, 2, 2),
        "fb.weight": (6, 0, 2),
        "head.weight": (5, 1, 2),
        "total": (15, 3, 6),
    }


class ConvFlattenLinear(nn.Module):
    """conv (3 channels of 3x3 on a 5x5 input) -> flatten (27 features) -> Linear(27, 2)."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.conv, self.flatten, self.fc = nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(27, 2)
        ones_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if self.style == "module":
            y = self.flatten(y)
        elif self.style == "function":
            y = torch.flatten(y, 1)
        else:
            y = y.view(y.size(0), -1)
        return self.fc(nn.functional.dropout(y, 0.5, self.training))


@pytest.mark.parametrize("style", ["module", "function", "view"])
@pytest.mark.parametrize("example_inputs", [None, torch.ones(1, 1, 5, 5)])
def test_flatten_maps_each_channel_to_its_block_of_features(
    style: str, example_inputs: torch.Tensor | None
) -> None:
    net = ConvFlattenLinear(style)
    with torch.no_grad():
        net.conv.weight[1] = 0.0  # features 9..17 are dead
        net.fc.weight[:, 18:] = 0.0  # channel 2 (features 18..26) is unread
        net.fc.weight[:, 4] = 0.0  # one feature of channel 0: the channel stays in use
    active = active_weights(net, example_inputs)
    assert active["fc.weight"][0].nonzero().flatten().tolist() == [*range(4), *range(5, 9)]
    assert counts(net, example_inputs) == {
        "conv.weight": (27, 9, 18),
        "fc.weight": (54, 20, 38),
        "total": (81, 29, 56),
    }


class FlattenThenConcat(nn.Module):
    """cat([flatten(conv(x)) (2 channels x 2x2 = 8 features), side(x) (2)]) -> Linear(10, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.side, self.head = nn.Conv2d(1, 2, 3), nn.Linear(16, 2), nn.Linear(10, 1)
        ones_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(torch.relu(self.conv(x)), 1)
        side = torch.relu(self.side(torch.flatten(x, 1)))
        return self.head(torch.cat([features, side], 1))


def test_flatten_then_concat_uses_shapes_or_falls_back() -> None:
    net, x = FlattenThenConcat(), torch.ones(3, 1, 4, 4)
    with torch.no_grad():
        net.conv.weight[1] = 0.0  # features 4..7 are dead
        net.side.weight[0] = 0.0  # concat feature 8 is dead
    assert counts(net, x) == {
        "conv.weight": (18, 9, 9),
        "side.weight": (32, 16, 16),
        "head.weight": (10, 0, 5),
        "total": (60, 25, 30),
    }
    # Without shapes the concat offsets of the flattened conv are unknown: no guessing.
    with pytest.warns(UserWarning, match="ops not understood: cat"):
        assert counts(net)["total"] == (60, 25, 25)


def test_masked_model_counts_the_mask_not_the_parameter() -> None:
    net = mlp(3, 4, 2)
    mask = masks.attach(net[0], "weight")
    mask[1] = 0.0
    assert bool((net[0].weight != 0).all())
    assert counts(net) == {"0.weight": (12, 3, 3), "2.weight": (8, 0, 2), "total": (20, 3, 5)}


def test_unknown_op_falls_back_to_direct_around_it_with_one_warning() -> None:
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)
            ones_(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x).t().t())

    net = Transposed()
    with torch.no_grad():
        net.fc1.weight[0] = 0.0  # would idle fc2[:, 0] if t() were understood
    with pytest.warns(UserWarning, match=r"ops not understood: Tensor\.t") as record:
        result = counts(net)
    assert len(record) == 1
    assert result == {"fc1.weight": (4, 2, 2), "fc2.weight": (4, 0, 0), "total": (8, 2, 2)}


def test_untraceable_model_reports_direct_sparsity_with_a_warning() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)
            ones_(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc1(x)
            return self.fc2(y) if y.sum() > 0 else y

    net = DataDependent()
    with torch.no_grad():
        net.fc1.weight[0] = 0.0
    with pytest.warns(UserWarning, match="could not trace DataDependent"):
        report = sparsity_report(net)
    assert report.direct_sparsity == report.effective_sparsity == 2 / 8


def test_report_dict_and_table() -> None:
    net = mlp(3, 4, 2)
    with torch.no_grad():
        net[0].weight[1] = 0.0
    report = sparsity_report(net)
    assert report.to_dict() == {
        "direct_sparsity": 3 / 20,
        "effective_sparsity": 5 / 20,
        "params": 20,
        "layers": {
            "0.weight": {
                "shape": [4, 3],
                "params": 12,
                "direct_sparsity": 0.25,
                "effective_sparsity": 0.25,
            },
            "2.weight": {
                "shape": [2, 4],
                "params": 8,
                "direct_sparsity": 0.0,
                "effective_sparsity": 0.25,
            },
        },
    }
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "shape", "params", "direct", "effective"]
    assert lines[3].split() == ["2.weight", "2x4", "8", "0.00%", "25.00%"]
    assert lines[-1].split() == ["total", "20", "15.00%", "25.00%"]
    assert len({len(line) for line in lines[2:4]}) == 1  # aligned columns


def small_resnet() -> nn.Module:
    sizes = [(16, 16, 1), (16, 32, 2), (32, 64, 2)]
    blocks = [BasicBlock(*size, skip="down", skip_bn=False) for size in sizes]
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip


def test_small_resnet_dead_channels_through_skips() -> None:
    torch.manual_seed(0)
    net = small_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net[0].weight[5] = 0.0  # stem channel 5: dead from the input, but the skips carry ...
        net[-1].weight[:, 7] = 0.0  # ... nothing; head channel 7 unread
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sparsity_report(net, x)
    layers = {layer.name: layer for layer in report.layers}
    # Stem channel 5 feeds block 1's conv1 and, via the identity skip, everything after it.
    assert layers["1.conv1.weight"].inactive == 16 * 9  # its input slice [:, 5]
    # Channel 7 of the last block reaches nothing: its conv2 row, its downsample row.
    assert layers["3.conv2.weight"].inactive == 64 * 9
    assert layers["3.down.0.weight"].inactive == 32
    assert layers["6.weight"].inactive == 10


class _Branchy(nn.Module):
    """A forward that torch.fx cannot trace (control flow on a value), around an MLP that it
    can: the MLP is read alone."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        return self.head(h) if float(h.sum()) > -1e9 else h


def test_a_model_that_does_not_trace_is_read_by_the_parts_that_do() -> None:
    net = _Branchy()
    with torch.no_grad():
        net.mlp[0].weight[1] = 0.0  # hidden unit 1 of the MLP is cut off from its input
    with pytest.warns(
        UserWarning, match=r"could not trace _Branchy .*traced 1 parts alone \(mlp\)"
    ):
        active = active_weights(net, torch.randn(2, 4))
    assert active["mlp.2.weight"][:, 1].tolist() == [False, False]  # found inside the part
    assert bool(active["mlp.2.weight"][:, [0, 2]].all())
    assert bool(active["head.weight"].all())  # outside the parts: the direct mask
