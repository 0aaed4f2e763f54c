import pytest
import torch

from compress.sparsity.importance import global_keep_masks, local_keep_mask, normed_abs_importance


def _pruned(masks: list[torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks)


@pytest.mark.parametrize("k", range(0, 8))
def test_global_prunes_exactly_k_with_ties(k: int) -> None:
    scores = [torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 3.0])]
    for sample in (2, 1 << 18):  # the sampled bracket and the direct path agree
        masks = global_keep_masks(scores, k, sample=sample)
        assert _pruned(masks) == k
        # Lower scores are always pruned before higher ones.
        kept = torch.cat([s[m] for s, m in zip(scores, masks)])
        pruned = torch.cat([s[~m] for s, m in zip(scores, masks)])
        if len(kept) and len(pruned):
            assert pruned.max() <= kept.min()


def test_global_on_large_sampled_input_is_exact() -> None:
    scores = [torch.rand(300_000), torch.rand(200_000).round(decimals=2)]  # many ties
    for level in (0.0, 0.37, 0.9, 0.999):
        k = round(level * 500_000)
        masks = global_keep_masks(scores, k, sample=4096)
        assert _pruned(masks) == k


def test_local_keep_mask_exact_with_ties() -> None:
    s = torch.zeros(10)
    assert int((~local_keep_mask(s, 3)).sum()) == 3
    assert local_keep_mask(torch.tensor([5.0]), 1).tolist() == [False]
    assert local_keep_mask(torch.tensor([5.0]), 0).tolist() == [True]


def test_normed_abs_divides_by_layer_norm() -> None:
    w = torch.tensor([3.0, -4.0])
    assert normed_abs_importance(w).tolist() == pytest.approx([0.6, 0.8])
    assert normed_abs_importance(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
