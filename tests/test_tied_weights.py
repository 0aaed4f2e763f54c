"""A weight shared between an Embedding and the output Linear (most language models): every
module that uses it sees the masked value, for every algorithm, and strip() equals the masked
model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mix(self.embed(tokens))))


TOKENS = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0))
RECIPES = {
    "magnitude_sparsity": {
        "algorithm": "magnitude_sparsity",
        "sparsity_init": 0.6,
        "params": {"sparsity_target": 0.6},
    },
    "rb_sparsity": {
        "algorithm": "rb_sparsity",
        "sparsity_init": 0.6,
        "params": {"sparsity_target": 0.6, "sparsity_freeze_epoch": 1, "sparsity_target_epoch": 1},
    },
    "const_sparsity": {"algorithm": "const_sparsity"},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_module_sees_the_masked_tied_weight_and_strip_equals_it(name: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    with torch.no_grad():
        model.embed.weight[model.embed.weight.abs() < 0.5] = 0  # zeros for const sparsity
    ctrl, model = compress.create_compressed_model(model, {"compression": RECIPES[name]}, TOKENS)
    if name == "rb_sparsity":
        with torch.no_grad():  # a learned mask that drops half the weights
            theta = model.lm_head.weight_rb_logit
            theta.copy_(torch.randn(theta.shape, generator=torch.Generator().manual_seed(1)))
        ctrl.scheduler.epoch_step()
        ctrl.scheduler.epoch_step()  # frozen
    with torch.no_grad():  # the stored values drift from the masked ones, as in training
        model.embed.weight.add_(0.01)
    if name == "magnitude_sparsity":
        ctrl.scheduler.epoch_step()
    model.eval()
    with torch.no_grad():
        seen = model.embed(TOKENS)
        masked = compress.masks.effective(model.lm_head, "weight")
        assert (masked == 0).float().mean() > 0.3
        torch.testing.assert_close(seen, masked[TOKENS], rtol=0, atol=0)
        out = model(TOKENS)
        plain = ctrl.strip().eval()
        assert plain.lm_head.weight is plain.embed.weight  # still tied
        torch.testing.assert_close(plain(TOKENS), out, rtol=0, atol=0)
        torch.testing.assert_close(plain.embed.weight, masked, rtol=0, atol=0)
