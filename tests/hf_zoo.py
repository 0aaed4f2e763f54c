"""Hugging Face models from small configs with random weights (never downloaded): BERT, RoBERTa,
DistilBERT, ViT, GPT-2, Phi-3, T5, CLIP, Llama, Mixtral, Qwen2-MoE and Whisper, each with example
inputs and a function reading its main output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Zoo:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor | None, ...]]


def _ids() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config)


def gpt2_config(**overrides: Any) -> Any:
    from transformers import GPT2Config

    sizes = {"vocab_size": 100, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 4}
    return GPT2Config(**sizes, bos_token_id=0, eos_token_id=0, **overrides)


def gpt2() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config())


def llama(**overrides: Any) -> nn.Module:
    """A small Llama; ``overrides`` change its config's sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16,
    }
    return LlamaForCausalLM(LlamaConfig(**(sizes | overrides)))


def mixtral(**overrides: Any) -> nn.Module:
    """A small Mixtral: 4 experts of width 128, 2 per token; 234,816 params, 196,608 of them in
    the experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    sizes = {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 16,
    }
    return MixtralForCausalLM(MixtralConfig(**(sizes | overrides)))


def qwen2_moe(**overrides: Any) -> nn.Module:
    """A small Qwen2-MoE: 4 experts of width 64, 2 per token, and a shared expert of width 128
    (as wide as ``intermediate_size``, which only dense layers read)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    sizes = {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 16,
    }
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**(sizes | overrides)))


def roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16 + 2,  # positions start after the padding index
        pad_token_id=1,
        num_labels=3,
    )
    return RobertaForSequenceClassification(config)


def phi3() -> nn.Module:
    """A small Phi-3: fused ``qkv_proj`` and ``gate_up_proj``, grouped-query attention."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        original_max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Phi3ForCausalLM(config)


def distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=100,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    return DistilBertForSequenceClassification(config)


def t5() -> nn.Module:
    """A small T5 encoder (``T5EncoderModel``: one input, the ids)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    return T5EncoderModel(config)


def clip_text() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config)


def whisper() -> nn.Module:
    """A tiny Whisper (encoder-decoder on log-mel features)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        d_model=16,
        max_source_positions=8,
        max_target_positions=8,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    return WhisperForConditionalGeneration(config)


def whisper_inputs() -> tuple[torch.Tensor | None, ...]:
    """Features, Whisper's positional ``attention_mask=None``, decoder token ids."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 8, 16, generator=gen), None, torch.randint(0, 100, (2, 4), generator=gen)


def _pixels() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


MORE = {
    "roberta": Zoo("roberta", roberta, _ids),
    "phi3": Zoo("phi3", phi3, _ids),
    "distilbert": Zoo("distilbert", distilbert, _ids),
    "t5": Zoo("t5", t5, _ids),
    "clip_text": Zoo("clip_text", clip_text, _ids),
    "whisper": Zoo("whisper", whisper, whisper_inputs),
}
"""Built for the save_pretrained round trip of filter pruning only."""

ZOO = {
    "bert": Zoo("bert", bert, _ids),
    "vit": Zoo("vit", vit, _pixels),
    "gpt2": Zoo("gpt2", gpt2, _ids),
    "llama": Zoo("llama", llama, _ids),
    "mixtral": Zoo("mixtral", mixtral, _ids),
    "qwen2_moe": Zoo("qwen2_moe", qwen2_moe, _ids),
}


def logits(out: object) -> torch.Tensor:
    """The main output: ``.logits`` (or ``.last_hidden_state``) of a ``ModelOutput``, or the
    tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, "logits", None)
    if value is None:  # a bare encoder (T5EncoderModel, CLIPTextModel)
        value = getattr(out, "last_hidden_state", None)
    if value is None and isinstance(out, (tuple, list)):
        value = out[0]
    assert isinstance(value, torch.Tensor)
    return value
