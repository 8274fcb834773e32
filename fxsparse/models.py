"""Tiny random decoder models for tests, examples and benchmarks (no hub needed).

The embedded default model (SmolLM2-135M-Instruct) and its cache live in the application:
:mod:`fxsparse.app.models`.

>>> model = tiny_model("llama")            # a 2-block random LLaMA with GQA, for tests and examples
>>> type(model).__name__
'LlamaForCausalLM'
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TINY_ARCHS", "tiny_config", "tiny_model"]


# Tiny random configurations, one per architecture family structure discovery must handle. Sizes are
# chosen so heads, KV heads, head size and channels are all distinct numbers (a swapped pair shows).
def _tiny_kwargs() -> dict[str, tuple[str, dict]]:
    common = dict(vocab_size=96, max_position_embeddings=64)
    return {
        "llama": ("LlamaConfig", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)),
        "mistral": ("MistralConfig", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                          num_attention_heads=6, num_key_value_heads=3)),
        "qwen2": ("Qwen2Config", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)),
        "qwen3": ("Qwen3Config", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=20)),
        "gemma": ("GemmaConfig", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
        "phi3": ("Phi3Config", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=2, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=2)),
        "gpt_neox": ("GPTNeoXConfig", dict(common, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                           num_attention_heads=6)),
        "opt": ("OPTConfig", dict(common, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                  num_attention_heads=6, word_embed_proj_dim=48)),
        "gpt2": ("GPT2Config", dict(vocab_size=96, n_positions=64, n_embd=48, n_inner=80, n_layer=2, n_head=6,
                                    bos_token_id=1, eos_token_id=2)),
    }


TINY_ARCHS = tuple(_tiny_kwargs())


def tiny_config(arch: str):
    """A tiny random transformers config of family ``arch`` (one of :data:`TINY_ARCHS`)."""
    import transformers

    try:
        cls_name, kwargs = _tiny_kwargs()[arch]
    except KeyError:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {list(TINY_ARCHS)}") from None
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(arch: str = "llama", seed: int = 0) -> nn.Module:
    """A tiny, randomly initialised causal LM of family ``arch``, in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    return model.eval()
