"""Hugging Face models from small configs under every sparsity algorithm and filter pruning:
build, a few steps, statistics, strip equals the masked model, pt2 export, save_pretrained."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_zoo import ZOO, gpt2_config, llama, logits

import compress
from compress.algorithm import weight

pytest.importorskip("transformers")

SPARSITY: list[dict[str, Any]] = [
    {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5},
    {"algorithm": "rb_sparsity", "sparsity_init": 0.5},
    {"algorithm": "const_sparsity"},
]


def _train(ctrl: compress.CompressionController, model: torch.nn.Module, x: tuple) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        loss = logits(model(*x)).pow(2).mean() + ctrl.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctrl.scheduler.step()


def _outputs(model: torch.nn.Module, x: tuple) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return logits(model(*x))


@pytest.mark.parametrize("algo", SPARSITY, ids=lambda a: a["algorithm"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_sparsity_on_hf_models(name: str, algo: dict[str, Any]) -> None:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    # lm_head of GPT-2 and Llama is tied to the token embedding: both read the masked weight
    ctrl, model = compress.create_compressed_model(model, {"compression": algo}, x)
    _train(ctrl, model, x)
    stats = ctrl.statistics().to_dict()["model"]
    layers = ctrl.algorithms[0].statistics()["layers"]
    if name == "gpt2":  # transformers' Conv1D blocks are compressed, not only Linear layers
        assert any(row["layer"].endswith("attn.c_attn") for row in layers)
    if algo["algorithm"] == "magnitude_sparsity":
        assert stats["sparsity of compressed layers"] == pytest.approx(0.5, abs=0.01)
    want = _outputs(model, x)
    plain = ctrl.strip()
    torch.testing.assert_close(_outputs(plain, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("algo", SPARSITY, ids=lambda a: a["algorithm"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_stripped_hf_models_export_and_round_trip(
    name: str, algo: dict[str, Any], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    ctrl, model = compress.create_compressed_model(model, {"compression": algo}, x)
    _train(ctrl, model, x)
    want = _outputs(model, x)
    plain = ctrl.strip()
    plain.save_pretrained(tmp_path / "hf")
    again = type(plain).from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    paths = compress.export(plain, tmp_path / "m", ["pt2"], example_inputs=x)
    program = torch.export.load(paths["pt2"]).module()
    torch.testing.assert_close(logits(program(*x)), want, rtol=1e-4, atol=1e-4)


def test_filter_pruning_removes_attention_heads_and_mlp_neurons() -> None:
    torch.manual_seed(0)
    zoo = ZOO["bert"]
    model, x = zoo.build(), zoo.inputs()
    # BERT derives the head size from hidden_size / num_attention_heads: heads only on request
    params = {"round_to": 1, "prune_beyond_config": True}
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": params}
    with pytest.warns(UserWarning, match="can remove at most"):
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    _train(ctrl, model, x)
    want = _outputs(model, x)
    small = ctrl.strip()
    attention = small.bert.encoder.layer[0].attention
    # 2 of 4 heads of 8 channels: q, k, v lose the same 16 outputs, the output layer its inputs
    assert [attention.self.query.out_features, attention.self.key.out_features] == [16, 16]
    assert attention.self.value.out_features == attention.output.dense.in_features == 16
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 32
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)
    stats = ctrl.statistics().to_dict()["algorithms"][0]
    assert 0.5 < stats["prunable MACs share"] < 1.0


def _pruned(name: str, **options: Any) -> tuple[Any, torch.nn.Module, tuple, torch.Tensor]:
    """Filter pruning at 0.5 (round_to 1), two steps: controller, masked model, inputs, outputs."""
    torch.manual_seed(0)
    zoo = ZOO[name]
    model, x = zoo.build(), zoo.inputs()
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": {"round_to": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage warning: LayerNorm-coupled groups stay
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe | options}, x)
    _train(ctrl, model, x)
    return ctrl, model, x, _outputs(model, x)


BEYOND = {"params": {"round_to": 1, "prune_beyond_config": True}}
"""Heads too where the config cannot state them (BERT, GPT-2): the export is the pruned file."""


def _round_trip(small: torch.nn.Module, x: tuple, path: Path) -> torch.Tensor:
    small.save_pretrained(path)
    return _outputs(type(small).from_pretrained(path), x)


def test_vit_head_pruning_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    # ViT reads config.head_dim: with the same head count in every layer (allocation uniform,
    # the default) the config states num_attention_heads = kept and head_dim = original size.
    ctrl, _, x, want = _pruned("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ctrl.strip()
    attention = small.vit.layers[0].attention
    assert attention.q_proj.out_features == attention.o_proj.in_features == 16
    assert (small.config.num_attention_heads, small.config.head_dim) == (2, 8)
    assert small.config.intermediate_size == 32
    torch.testing.assert_close(_round_trip(small, x, tmp_path / "hf"), want, rtol=1e-5, atol=1e-5)


def test_vit_mlp_only_pruning_round_trips(tmp_path: Path) -> None:
    ctrl, _, x, want = _pruned("vit", ignored_scopes=["{re}.*attention.*"])
    small = ctrl.strip()
    assert small.config.intermediate_size == 32
    assert small.config.num_attention_heads == 4
    torch.testing.assert_close(_round_trip(small, x, tmp_path / "hf"), want, rtol=1e-5, atol=1e-5)


def test_head_counts_that_differ_between_layers_are_warned_of() -> None:
    ratios = {"vit.layers.0.attention.q_proj": 0.25}
    ctrl, _, _, _ = _pruned("vit", params={"round_to": 1, "layer_ratios": ratios})
    with pytest.warns(UserWarning, match=r"different widths \(\[16, 24\]\); one ratio for every"):
        small = ctrl.strip()
    assert small.config.num_attention_heads == 4  # left as it was


def test_bert_heads_the_config_cannot_describe_are_warned_of_with_what_to_do(
    tmp_path: Path,
) -> None:
    ctrl, _, x, want = _pruned("bert", **BEYOND)
    with pytest.warns(UserWarning, match=r"derives the head size from hidden_size") as record:
        small = ctrl.strip()
    message = str(record[0].message)
    assert "formats=['pruned']" in message
    assert small.config.num_attention_heads == 4  # left as it was, not half-updated
    assert small.config.intermediate_size == 64
    # what the warning offers: the pruned file rebuilds the small model from a fresh instance
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    again = compress.load_pruned(ZOO["bert"].build(), paths["pruned"])
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    # ... or the ignored_scopes it names, after which save_pretrained rebuilds the model
    scopes = eval(message.rpartition("ignored_scopes: ")[2])  # noqa: S307 - a list literal
    ctrl, _, x, want = _pruned("bert", ignored_scopes=scopes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ctrl.strip()
    assert small.config.intermediate_size == 32
    torch.testing.assert_close(_round_trip(small, x, tmp_path / "hf"), want, rtol=1e-5, atol=1e-5)


def test_gpt2_filter_pruning_removes_heads_and_mlp_neurons(tmp_path: Path) -> None:
    ctrl, model, x, want = _pruned("gpt2", **BEYOND)
    groups = {g.name: g.size for g in ctrl.algorithms[0].groups}
    # whole heads of the fused c_attn (q, k, v of one head together), and the MLP's neurons
    assert groups["transformer.h.0.attn.c_attn"] == 4
    assert groups["transformer.h.0.mlp.c_fc"] == 128
    with pytest.warns(UserWarning, match=r"ignored_scopes: \['transformer\.h\.\*\.attn\.c_attn'\]"):
        small = ctrl.strip()
    attention, mlp = small.transformer.h[0].attn, small.transformer.h[0].mlp
    # 2 of 4 heads of 8: each of q, k, v keeps 16 outputs, the output projection 16 inputs
    assert (attention.c_attn.nf, attention.c_proj.nx, attention.split_size) == (48, 16, 16)
    assert (mlp.c_fc.nf, mlp.c_proj.nx) == (64, 64)
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)
    paths = compress.export(small, tmp_path / "m", ["pt2", "pruned"], example_inputs=x)
    assert small.config.use_cache is True  # exported without the cache, which stays on
    program = torch.export.load(paths["pt2"]).module()
    torch.testing.assert_close(logits(program(*x)), want, rtol=1e-4, atol=1e-4)
    again = compress.load_pruned(ZOO["gpt2"].build(), paths["pruned"])
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    # the embedding tied to lm_head counts once, before and after
    params = ctrl.algorithms[0].statistics()["summary"][1]
    assert params["full"] == sum(p.numel() for p in model.parameters())
    assert params["current"] == sum(p.numel() for p in small.parameters())


def test_gpt2_mlp_pruning_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    ctrl, _, x, want = _pruned("gpt2")  # by default, only what the config states
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ctrl.strip()
    assert small.config.n_inner == 64
    torch.testing.assert_close(_round_trip(small, x, tmp_path / "hf"), want, rtol=1e-5, atol=1e-5)


def test_a_trace_that_never_ends_stops_at_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.pruning.channel_groups as channel_groups

    def endless(model: torch.nn.Module, inputs: object, **kwargs: object) -> None:
        while True:  # a search that never ends, through Python calls as Torch-Pruning's does
            (lambda: None)()

    monkeypatch.setattr(channel_groups, "dependency_graph", endless)
    zoo = ZOO["bert"]
    recipe = {"algorithm": "filter_pruning", "params": {"trace_time_budget": 1}}
    with pytest.raises(compress.CompressError, match="BertForSequenceClassification within 1 s"):
        compress.create_compressed_model(zoo.build(), {"compression": recipe}, zoo.inputs())


def test_a_model_torch_pruning_cannot_trace_gets_no_groups_and_strips(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from compress.pruning import structured

    def fails(*args: object, **kwargs: object) -> None:
        # what Torch-Pruning raised on GPT-2's key/value cache before tracing turned it off
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(structured.tp.DependencyGraph, "build_dependency", fails)
    zoo = ZOO["gpt2"]
    model, x = zoo.build(), zoo.inputs()
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5}
    with pytest.warns(UserWarning, match="Torch-Pruning could not trace GPT2LMHeadModel"):
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    assert ctrl.algorithms[0].groups == []
    torch.testing.assert_close(_outputs(ctrl.strip(), x), _outputs(model, x))


def test_decoders_keep_their_cache_and_are_traced_without_it() -> None:
    # GPT-2 and Llama return a key/value cache by default; the trace runs without it
    for name in ("gpt2", "llama"):
        zoo = ZOO[name]
        model, x = zoo.build(), zoo.inputs()
        assert model.config.use_cache is True
        recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the norm-coupled groups left whole
            ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
        assert ctrl.algorithms[0].groups
        assert model.config.use_cache is True
        model.eval()
        out = model(*x)
        assert out.past_key_values is not None
        small = ctrl.strip()
        assert sum(p.numel() for p in small.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
        torch.testing.assert_close(_outputs(small, x), logits(out), rtol=1e-5, atol=1e-5)


def _llama_filter_pruning(recipe: dict[str, Any], **sizes: int) -> tuple[Any, Any, tuple]:
    torch.manual_seed(0)
    model = llama(**sizes)
    x = ZOO["llama"].inputs()
    # the budget turns a group search that never ends into an error instead of a hang
    params = {"trace_time_budget": 60, **recipe.get("params", {})}
    full = {"algorithm": "filter_pruning", **recipe, "params": params}
    with pytest.warns(UserWarning, match="LlamaRMSNorm: its statistics include the zeroed"):
        ctrl, model = compress.create_compressed_model(model, {"compression": full}, x)
    return ctrl, model, x


def test_llama_filter_pruning_removes_kv_groups_and_mlp_neurons(tmp_path: Path) -> None:
    from transformers.models.llama import modeling_llama

    rotate_half = modeling_llama.rotate_half
    ctrl, model, x = _llama_filter_pruning({"pruning_init": 0.5})
    assert modeling_llama.rotate_half is rotate_half  # the trace's stand-in is gone
    _train(ctrl, model, x)
    want = _outputs(model, x)
    small = ctrl.strip()
    for block in small.model.layers:
        attention = block.self_attn
        # one of two key/value heads, with the two query heads that read it
        assert [attention.q_proj.out_features, attention.o_proj.in_features] == [16, 16]
        assert [attention.k_proj.out_features, attention.v_proj.out_features] == [8, 8]
        assert block.mlp.gate_proj.out_features == block.mlp.up_proj.out_features == 32
        assert block.mlp.down_proj.in_features == 32
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)
    config = small.config
    assert [config.num_attention_heads, config.num_key_value_heads] == [2, 1]
    assert [config.head_dim, config.intermediate_size, config.hidden_size] == [8, 32, 32]
    small.save_pretrained(tmp_path / "hf")
    again = type(small).from_pretrained(tmp_path / "hf")
    assert again.model.layers[1].self_attn.k_proj.out_features == 8
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
    excluded = ctrl.algorithms[0].statistics()["excluded"]
    assert any("LlamaRMSNorm" in str(row) for row in excluded)


def test_llama_query_heads_go_with_the_key_value_head_they_read() -> None:
    # 8 query heads of 8 channels read 2 key/value heads: query heads 0-3 read key head 0
    recipe = {"params": {"prune_channels": {"model.layers.0.self_attn.k_proj": "0-7"}}}
    ctrl, model, x = _llama_filter_pruning(recipe, hidden_size=64, num_attention_heads=8)
    attention = model.model.layers[0].self_attn
    q, k, v = (weight(getattr(attention, f"{n}_proj")).detach().clone() for n in "qkv")
    want = _outputs(model, x)
    with pytest.warns(UserWarning, match=r"num_attention_heads: the layers keep different widths"):
        small = ctrl.strip()  # layer 1 keeps its heads: the config cannot say so
    pruned = small.model.layers[0].self_attn
    torch.testing.assert_close(pruned.q_proj.weight, q[32:])
    torch.testing.assert_close(pruned.k_proj.weight, k[8:])
    torch.testing.assert_close(pruned.v_proj.weight, v[8:])
    assert pruned.o_proj.in_features == 32
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pruned_llama_exports(tmp_path: Path) -> None:
    ctrl, model, x = _llama_filter_pruning({"pruning_init": 0.5, "params": {"round_to": 1}})
    want = _outputs(model, x)
    small = ctrl.strip()
    paths = compress.export(small, tmp_path / "m", ["pt2", "pruned"], example_inputs=x)
    program = torch.export.load(paths["pt2"]).module()
    torch.testing.assert_close(logits(program(*x)), want, rtol=1e-4, atol=1e-4)
    rebuilt = compress.load_pruned(type(model)(model.config), paths["pruned"])
    torch.testing.assert_close(_outputs(rebuilt, x), want, rtol=1e-5, atol=1e-5)


def test_qwen3_heads_go_and_the_norm_they_share_stays() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        use_cache=False,
    )
    model, x = Qwen3ForCausalLM(config), ZOO["llama"].inputs()
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5}
    with pytest.warns(UserWarning, match="Qwen3RMSNorm: its statistics include"):
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
    norm = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    want = _outputs(model, x)
    small = ctrl.strip()
    attention = small.model.layers[0].self_attn
    # q_norm normalises each head's 8 channels with one weight that every head shares
    assert [attention.q_proj.out_features, attention.k_proj.out_features] == [16, 8]
    torch.testing.assert_close(attention.q_norm.weight, norm)
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)


def test_gpt2_latency_target_and_scop_see_the_conv1d_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from compress.pruning import latency

    monkeypatch.setattr(latency, "default_timer", latency.layer_macs_timer)  # planned, not timed
    ctrl, model, x, want = _pruned("gpt2", params={"round_to": 1, "pruning_latency_target": 0.3})
    algo = ctrl.algorithms[0]
    layers = algo.latency()["layers"]
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(layers)
    assert algo.statistics()["latency removed (predicted)"] == pytest.approx(0.3, abs=0.05)
    small = ctrl.strip()
    assert small.transformer.h[0].mlp.c_fc.nf < 128 or small.transformer.h[0].attn.c_attn.nf < 96
    torch.testing.assert_close(_outputs(small, x), want, rtol=1e-5, atol=1e-5)

    options = {"round_to": 1, "filter_importance": "scop", "num_init_steps": 1}
    ctrl, model, x, _ = _pruned("gpt2", params=options)
    assert "transformer.h.0.mlp.c_fc" in ctrl.algorithms[0].scop.coefficients
    ctrl.scheduler.epoch_step()  # the knockoff phase ends, the learned scores choose
    want = _outputs(model, x)
    torch.testing.assert_close(_outputs(ctrl.strip(), x), want, rtol=1e-5, atol=1e-5)


def test_gpt2_without_lm_head_prunes_heads_too() -> None:
    # GPT2Model alone: Torch-Pruning's reshape mapping would scale the split parts' channels by
    # three here; the views of the parts keep their channel order
    from transformers import GPT2Model

    torch.manual_seed(0)
    config = gpt2_config(n_inner=64, use_cache=False)
    model, x = GPT2Model(config), ZOO["gpt2"].inputs()
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5} | BEYOND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl, model = compress.create_compressed_model(model, {"compression": recipe}, x)
        small = ctrl.strip().eval()
    assert {g.name: g.size for g in ctrl.algorithms[0].groups}["h.0.attn.c_attn"] == 4
    assert (small.h[0].attn.c_attn.nf, small.h[0].mlp.c_fc.nf) == (48, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(*x)[0], model(*x)[0], rtol=1e-5, atol=1e-5)


def test_an_mlp_as_wide_as_the_hidden_size_still_updates_the_config(tmp_path: Path) -> None:
    # intermediate_size == hidden_size: the projections back to the hidden size have the same
    # width as the MLP's and keep it; the config still states the pruned model
    ctrl, model, x = _llama_filter_pruning({"pruning_init": 0.5}, intermediate_size=32)
    want = _outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = ctrl.strip()
    assert [small.config.intermediate_size, small.config.hidden_size] == [16, 32]
    assert small.model.layers[0].mlp.down_proj.in_features == 16
    torch.testing.assert_close(_round_trip(small, x, tmp_path / "hf"), want, rtol=1e-5, atol=1e-5)


def _fit_on_dict_batches(
    tmp_path: Path, recipe: dict[str, Any], formats: tuple[str, ...] = ("sparse",)
) -> tuple[Any, Any, list]:
    """BERT trained the way a Hugging Face user trains it: batches are dicts (input_ids,
    attention_mask, labels) and the LightningModule calls ``self.model(**batch)``."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from callbacks import CompressionCallback

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = ZOO["bert"].build()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(0, 100, (8,), generator=gen),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]
    torch.manual_seed(0)
    lit = Lit()
    cb = CompressionCallback(
        {"compression": recipe},
        model_attr="model",
        verbose=False,
        export_dir=tmp_path / "out",
        export_formats=list(formats),
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # filter pruning's coverage and config notices
        trainer.fit(lit, DataLoader(rows, batch_size=4))
    return cb, lit, rows


def test_a_lightning_module_on_hf_dict_batches(tmp_path: Path) -> None:
    # the callback takes its example inputs from the batch's input_ids
    recipe = {"algorithm": "magnitude_sparsity", "sparsity_init": 0.5}
    cb, lit, rows = _fit_on_dict_batches(tmp_path, recipe)
    assert cb.ctrl is not None and cb.ctrl.example_inputs[0].shape == (4, 8)
    stats = cb.ctrl.statistics().to_dict()["model"]
    assert stats["sparsity of compressed layers"] == pytest.approx(0.5, abs=0.01)
    x = (rows[0]["input_ids"][None],)
    want = _outputs(lit.model, x)
    plain = compress.load_sparse(cb.exported["sparse"], ZOO["bert"].build())
    torch.testing.assert_close(_outputs(plain, x), want)
    torch.testing.assert_close(_round_trip(lit.model, x, tmp_path / "hf"), want)


def test_feature_map_importance_calibrates_on_hf_dict_batches(tmp_path: Path) -> None:
    params = {"filter_importance": "nuclear_norm", "calibration_batches": 2, "round_to": 1}
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5, "params": params}
    cb, lit, rows = _fit_on_dict_batches(tmp_path, recipe, ("pruned",))
    algo = cb.ctrl.algorithms[0]
    assert algo.calibration and "bert.encoder.layer.0.intermediate.dense" in algo.calibration
    small = compress.load_pruned(ZOO["bert"].build(), cb.exported["pruned"])
    x = (rows[0]["input_ids"][None],)
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 32
    torch.testing.assert_close(_outputs(small, x), _outputs(lit.model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_heads_beyond_the_config_are_said_before_training_with_the_pruned_export(
    name: str, tmp_path: Path
) -> None:
    zoo = ZOO[name]
    recipe = {"algorithm": "filter_pruning", "pruning_init": 0.5} | BEYOND
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compress.create_compressed_model(zoo.build(), {"compression": recipe}, zoo.inputs())
    said = [str(w.message) for w in record if "config cannot state" in str(w.message)]
    assert len(said) == 1 and "formats=['pruned']" in said[0]
    # what it offers: the pruned file rebuilds the small model on a fresh instance
    ctrl, _, x, want = _pruned(name, **BEYOND)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config is left as it was: said again at strip()
        small = ctrl.strip()
    paths = compress.export(small, tmp_path / "m", ["pruned"], example_inputs=x)
    again = compress.load_pruned(zoo.build(), paths["pruned"])
    torch.testing.assert_close(_outputs(again, x), want, rtol=1e-5, atol=1e-5)
