"""50% filter pruning of the Hugging Face models the zoo tests build (BERT, ViT, GPT-2, Llama
from small configs, random weights): params, MACs and CPU latency of the dense model, of
``ctrl.strip()`` after ``filter_pruning`` at ``pruning_init`` 0.5 (``round_to`` 1), and of
Torch-Pruning's own ``MetaPruner`` at the same ratio (L2 magnitude, whole heads, the output
layer kept). Latency: batch 8 x 64 tokens (ViT: 8 images of 64x64), medians and ranges over
interleaved repetitions, one process. A row that fails says why instead of a number.

    python benchmarks/zoo_pruning.py              # hidden 256, 4 layers, 8 heads
    python benchmarks/zoo_pruning.py --quick      # hidden 64, 2 layers: a smoke run
    python benchmarks/zoo_pruning.py --models gpt2  # one model
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compress  # noqa: E402
from compress.errors import CompressError  # noqa: E402
from compress.pruning.sizes import count_macs_params  # noqa: E402


def models(hidden: int, layers: int, heads: int) -> dict[str, Callable[[], nn.Module]]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        ViTConfig,
        ViTForImageClassification,
    )

    common = {"num_hidden_layers": layers, "num_attention_heads": heads}
    mlp = {"hidden_size": hidden, "intermediate_size": 4 * hidden}
    gpt2 = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": 128}
    ids = {"bos_token_id": 0, "eos_token_id": 0, "use_cache": False}
    kv = {"num_key_value_heads": heads // 2, "max_position_embeddings": 128, "use_cache": False}
    return {
        "bert": lambda: BertForSequenceClassification(BertConfig(vocab_size=1000, **mlp, **common)),
        "vit": lambda: ViTForImageClassification(
            ViTConfig(image_size=64, patch_size=8, **mlp, **common)
        ),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=1000, **gpt2, **ids)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=1000, **mlp, **kv, **common)),
    }


def inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    if name == "vit":
        return (torch.randn(batch, 3, 64, 64, generator=gen),)
    return (torch.randint(0, 1000, (batch, 64), generator=gen),)


def ours(model: nn.Module, x: tuple[torch.Tensor, ...], budget: float) -> nn.Module:
    recipe = {
        "algorithm": "filter_pruning",
        "pruning_init": 0.5,
        "params": {"round_to": 1, "trace_time_budget": budget},
    }
    ctrl, _ = compress.create_compressed_model(model, {"compression": recipe}, x)
    return ctrl.strip()


def torch_pruning(model: nn.Module, x: tuple[torch.Tensor, ...], budget: float) -> nn.Module:
    from compress.pruning.deadline import TimeBudgetExceeded, deadline

    heads = {}
    for module in model.modules():
        for q, k, v in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):
            if all(hasattr(module, a) for a in (q, k, v)):
                n = getattr(
                    module, "num_attention_heads", getattr(model.config, "num_attention_heads", 1)
                )
                for a in (q, k, v):
                    heads[getattr(module, a)] = n
    outputs = [m for n, m in model.named_modules() if n.endswith(("classifier", "lm_head"))]
    try:
        with deadline(budget):
            pruner = tp.pruner.MetaPruner(
                model,
                x,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.5,
                ignored_layers=outputs,
                num_heads=heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=0.5,
                forward_fn=lambda m, a: m(*a).logits,
            )
            pruner.step()
    except TimeBudgetExceeded:
        raise CompressError(f"Torch-Pruning did not finish within {budget:g} s") from None
    return model


def torch_pruning_plain_rotary(
    model: nn.Module, x: tuple[torch.Tensor, ...], budget: float
) -> nn.Module:
    """Torch-Pruning alone, with the trace seeing ``rotate_half`` as the identity, as ours does."""
    from compress.pruning.attention import rotary_as_identity

    with rotary_as_identity(model):
        return torch_pruning(model, x, budget)


def latency(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Callable[[], float]:
    model.eval()

    def run() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model(*x)
            return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=60.0, help="trace time budget, s")
    parser.add_argument("--models", default="bert,vit,gpt2,llama", help="comma-separated subset")
    args = parser.parse_args()
    hidden, layers, heads = (64, 2, 4) if args.quick else (256, 4, 8)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    chosen = args.models.split(",")
    for name, build in models(hidden, layers, heads).items():
        if name not in chosen:
            continue
        torch.manual_seed(0)
        dense = build().eval()
        trace_x = inputs(name, 1)
        x = inputs(name, 8)
        variants: dict[str, nn.Module | str] = {"dense": dense}
        pruners = [("ours", ours), ("Torch-Pruning", torch_pruning)]
        if name == "llama":
            pruners.append(("Torch-Pruning, rotate_half as identity", torch_pruning_plain_rotary))
        for label, fn in pruners:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    variants[label] = fn(copy.deepcopy(dense), trace_x, args.budget).eval()
                except Exception as err:  # noqa: BLE001 - a failure is a result of the table
                    variants[label] = f"fails: {type(err).__name__}: {str(err)[:60]}"
        timers = {}
        for label, model in variants.items():
            if isinstance(model, nn.Module):
                try:
                    latency(model, x)()  # warm-up, and a check that it still runs
                    timers[label] = latency(model, x)
                except Exception as err:  # noqa: BLE001
                    variants[label] = f"fails to run: {type(err).__name__}: {str(err)[:60]}"
        times: dict[str, list[float]] = {label: [] for label in timers}
        for _ in range(args.repeats):  # interleaved: load changes hit every variant alike
            for label, timer in timers.items():
                times[label].append(timer() * 1e3)
        for label, model in variants.items():
            row: dict[str, Any] = {"model": name, "variant": label}
            if isinstance(model, str):
                row["result"] = model
            else:
                macs, params = count_macs_params(model, x)
                t = times[label]
                row |= {
                    "params": params,
                    "MACs (batch 8)": macs,
                    "latency ms": f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})",
                }
            rows.append(row)
            print(row, flush=True)
    cols = ["model", "variant", "params", "MACs (batch 8)", "latency ms", "result"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [
            f"{row[c]:,}" if isinstance(row.get(c), int) else str(row.get(c, "")) for c in cols
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
