"""The transformers zoo: every causal-LM architecture transformers ships, built tiny, through inspect, S²FT and merge.

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` the harness builds a tiny random float32 model (hidden 48,
6 heads, 2 KV heads (MQA configs keep 1; latent-attention configs and configs that insist keep 6), head size 8,
FFN 80, 4 experts of 32 channels with 2 per token, 2 layers chosen so that every layer type of the config appears,
vocabulary 128, 64 positions, sliding windows of 4 tokens), set
through each config's own attribute names (and those of its sub-configs, e.g. ``text_config``), with
``attn_implementation="sdpa"`` where the class supports it, else ``"eager"``. Every parameter gets a little noise
so that norms and biases are not all ones and zeros (a permutation that forgets a norm weight shows). Then:

- **build**: ``cannot-build`` when the config, the model or a forward on token ids fails; ``out-of-scope`` when
  no softmax attention runs in a forward (state-space, RWKV, recurrent or convolutional models);
- **capture**: ``fxsparse.capture.capture`` exports the model (and names the fallback it needed, if any);
- **inspect**: what ``fxsparse.inspect`` finds (``find_structure`` on that graph) against the config — one
  attention per module where a softmax attention ran,
  heads, KV heads and head size equal to the config's, FFN channels one of the config's FFN widths, one FFN per
  layer for dense models;
- **s2ft**: ``fxsparse.transform`` with every projection selected (q, k, v, o, gate, up, down at 0.5, all layers,
  ``verify=False`` so a changed function is measured here, not refused) must give the same logits on fresh
  random ids (batch 2, 11 tokens) within a relative error of 1e-5; more is ``inexact``;
- **merge**: ``fxsparse.merge`` must give back the original state dict and logits (else ``inexact`` too).

A projection discovery does not recognise is left dense: that is a pass as long as the function is exact.
Each architecture runs in a worker process (``--jobs`` of them, each reused for up to 20 architectures with the
seed and dynamo reset between them, and replaced after a timeout or a crash) under a limit of 60 s of CPU time per
architecture (``--timeout``; a worker still on one architecture after 6 times that in wall time is killed).
The table goes to ``benchmarks/results/zoo.md`` and ``zoo.csv``::

    python benchmarks/zoo.py                      # the whole zoo (about 11 minutes with 2 workers on 2 cores)
    python benchmarks/zoo.py --arch llama,gpt2    # a few, printed; the table is not rewritten
    python benchmarks/zoo.py --arch olmo2 --write # refresh those rows of the table
    python benchmarks/zoo.py --arch mixtral --jobs 0 -v   # in this process, with the model's own warnings
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import inspect as pyinspect
import multiprocessing
import os
import re
import signal
import sys
import time
import traceback
import warnings
from multiprocessing.connection import wait
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from _env import cpu_name, git_rev  # noqa: E402

RESULTS = BENCHMARKS / "results"
MD_PATH = RESULTS / "zoo.md"
CSV_PATH = RESULTS / "zoo.csv"
FIELDS = ["arch", "status", "stage", "reason", "notes", "seconds"]

# Stages in order; a row's stage is where it stopped ("pass": it went through all of them).
STAGES = ("build", "capture", "inspect", "s2ft", "merge", "pass")
IN_SCOPE = ("pass", "fail", "inexact")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, MOE_FFN, SHARED_FFN = 48, 6, 2, 8, 80, 32, 40
VOCAB, POSITIONS, WINDOW, LAYERS = 128, 64, 4, 2
RATIOS = {role: 0.5 for role in ("q", "k", "v", "o", "gate", "up", "down")}
EXACT = 1e-5  # relative logit error allowed in float32 (check_function's float32 tolerance)
CHECK_SHAPE = (2, 11)  # the fresh random ids logits are compared on
PROBE_LEN = 13  # sequence length of the forward that looks for softmax attention (a prime no size here equals)
TIMEOUT = 60.0

# Generic size -> the attribute names configs use for it (after ``attribute_map``).
_NAMES = {
    HIDDEN: ("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "model_dim", "n_embed", "hidden_dim",
             "word_embed_proj_dim", "embedding_size", "emb_dim"),
    HEADS: ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
            "encoder_attention_heads", "num_attention_heads_per_layer", "swa_num_attention_heads"),
    KV_HEADS: ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_kv_groups", "swa_num_key_value_heads"),
    HEAD_DIM: ("head_dim", "attention_head_dim", "kv_channels", "d_head", "dim_head", "head_size", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "global_head_dim", "kv_head_dim", "swa_head_dim"),
    FFN: ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "decoder_ffn_dim",
          "encoder_ffn_dim", "inner_hidden_size", "dff", "dim_ff", "dense_intermediate_size", "mlp_hidden_size",
          "d_inner"),
    MOE_FFN: ("moe_intermediate_size", "expert_intermediate_size", "expert_dim", "moe_ffn_hidden_size"),
    SHARED_FFN: ("shared_expert_intermediate_size", "shared_intermediate_size"),
    VOCAB: ("vocab_size",),
    POSITIONS: ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length"),
}
_LAYER_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
_EXPERT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_TOPK_NAMES = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "topk")
_SMALL_ONES = ("n_group", "topk_group", "first_k_dense_replace", "n_shared_experts", "num_shared_experts",
               "moe_num_shared_experts")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
              "mask_token_id", "decoder_start_token_id")
_LOW_RANKS = {"q_lora_rank": 24, "kv_lora_rank": 16}
# Architectures whose layer pattern is not a per-layer list the generic cut handles.
_SPECIAL = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]},
            "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
            "reformer": {"axial_pos_embds_dim": [16, 32], "axial_pos_shape": [8, 8]},
            "zaya": {"num_experts_per_tok": 1},
            "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # its default leaves layer_types None
            "mimo_v2_flash": {"num_key_value_heads": 3}}  # sliding layers have twice the KV heads: 6 must divide
# What a model builds that its config does not say: MiMo-V2-Flash's sliding-window layers have twice the config's KV
# heads (``num_key_value_heads * 2 if is_swa`` in its modeling code).
_EXPECT_ALSO = {"mimo_v2_flash": {"kv_heads": {2 * 3}}}
_WINDOWS = ("sliding_window", "window_size", "attention_window", "local_attention", "attention_chunk_size")


class ArchTimeout(BaseException):
    """The per-architecture time ran out (a BaseException so that no ``except Exception`` in model code eats it)."""


class _CpuLimit:
    """Raises ``ArchTimeout`` in the main thread once this process has used ``seconds`` of CPU, then again every
    50 ms of CPU until one lands: an exception raised by a signal handler while the interpreter runs a gc or
    weakref callback (hypothesis installs gc callbacks) is printed as "unraisable" and dropped, so a one-shot
    timer can be lost and the architecture would run on unlimited."""

    REFIRE = 0.05

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = bool(seconds) and hasattr(signal, "SIGPROF")
        self.fired = self.landed = False
        self._previous = None

    def _on_alarm(self, signum, frame):
        self.fired = True
        if not self.landed:
            raise ArchTimeout()

    def __enter__(self):
        if self.active:
            self._previous = signal.signal(signal.SIGPROF, self._on_alarm)
            signal.setitimer(signal.ITIMER_PROF, self.seconds, self.REFIRE)
        return self

    def __exit__(self, *exc_info):
        self.landed = True  # first: a signal still pending after this line is a no-op
        if self.active:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self._previous)
        return False


class Stop(Exception):
    """A stage failed: ``stage`` and a one-line ``reason``."""

    def __init__(self, stage: str, reason: str, status: str = "fail"):
        super().__init__(reason)
        self.stage, self.reason, self.status = stage, reason, status


# ---------------------------------------------------------------- tiny configs


def _attr_name(config, name: str) -> str:
    return getattr(config, "attribute_map", {}).get(name, name)


def _layer_indices(base, layers: int) -> list[int]:
    """Which layers of the default config the tiny one keeps: the first of each layer type, then the first others."""
    types = getattr(base, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) < layers:
        return list(range(layers))
    chosen: list[int] = []
    for i, kind in enumerate(types):
        if kind not in [types[j] for j in chosen]:
            chosen.append(i)
    for i in range(len(types)):
        if len(chosen) >= layers:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _tiny_overrides(base, full_subconfigs: bool = False) -> dict:
    """Keyword arguments that make ``type(base)`` tiny, in the config's own attribute names.

    Sub-configs are given as dicts of the overrides alone (their class's defaults for the rest), or with
    ``full_subconfigs`` as the default sub-config's whole dict with the overrides on top.
    """
    kwargs: dict = {}

    def has(name: str) -> bool:
        try:
            return name in vars(base) or hasattr(type(base), name) or hasattr(base, name)
        except Exception:  # noqa: BLE001 - e.g. a per-layer attribute that refuses a global read
            return False

    def get(name: str):
        try:
            return getattr(base, name, None)
        except Exception:  # noqa: BLE001
            return None

    for value, names in _NAMES.items():
        for name in names:
            real = _attr_name(base, name)
            if has(real) and kwargs.get(real) is None:
                current = get(real)
                if isinstance(current, bool) or (current is not None and not isinstance(current, int)):
                    continue
                if current is None and value not in (HEAD_DIM, FFN, KV_HEADS):
                    continue
                if name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "global_head_dim",
                            "kv_head_dim") and current is None:
                    continue
                kwargs[real] = value
                if value == KV_HEADS and current is not None:
                    heads = _first(base, _NAMES[HEADS])
                    if current == 1:
                        kwargs[real] = 1  # MQA stays MQA
                    elif heads is not None and current == heads and has("kv_lora_rank"):
                        kwargs[real] = HEADS  # multi-head latent attention expands K/V to every head
    for name in _EXPERT_NAMES:
        if has(name) and isinstance(get(name), int) and get(name) > 0:
            kwargs[name] = 4
        elif has(name) and get(name) is None and isinstance(get("moe_intermediate_size"), int):
            kwargs[_attr_name(base, name)] = 4  # an MoE config whose default leaves the expert count unset
    for name in _TOPK_NAMES:
        if has(name) and isinstance(get(name), int) and get(name) > 0:
            kwargs[name] = 2
    for name in _SMALL_ONES:
        if has(name) and isinstance(get(name), int) and get(name) > 1:
            kwargs[name] = 1
    for name, value in _LOW_RANKS.items():
        if has(name) and isinstance(get(name), int):
            kwargs[name] = value
    for name in _WINDOWS:
        if has(name) and isinstance(get(name), int) and not isinstance(get(name), bool):
            kwargs[name] = WINDOW
    if has("use_sliding_window") and get("use_sliding_window") is False:
        kwargs["use_sliding_window"] = True
    if has("is_decoder"):
        kwargs["is_decoder"] = True
    for name in _TOKEN_IDS:
        value = get(name)
        if isinstance(value, int) and value >= VOCAB:
            kwargs[name] = min(_TOKEN_IDS.index(name), 3)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= VOCAB for v in value):
            kwargs[name] = [min(_TOKEN_IDS.index(name), 3)]
    # layers: keep one of each layer type, and cut every per-layer list the same way
    for name in _LAYER_NAMES:
        real = _attr_name(base, name)
        if has(real) and isinstance(get(real), int) and get(real) > 0:
            original = get(real)
            keep = _layer_indices(base, min(LAYERS, original))
            types = getattr(base, "layer_types", None)
            if isinstance(types, (list, tuple)) and len(types) >= original:
                keep = _layer_indices(base, min(max(LAYERS, len(set(types))), original))
            kwargs[real] = len(keep)
            for attr, value in vars(base).items():
                if isinstance(value, (list, tuple)) and len(value) == original and attr not in kwargs:
                    kwargs[attr] = [value[i] for i in keep]
                    size = next((size for size, names in _NAMES.items() if attr in names), None)
                    if size is not None and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                        kwargs[attr] = [size] * len(keep)  # a per-layer size (heads per layer): the generic one
                elif (isinstance(value, dict) and value and attr not in kwargs
                      and all(isinstance(k, int) and 0 <= k < original for k in value)):
                    kwargs[attr] = {new: value[old] for new, old in enumerate(keep) if old in value}
    for name in list(vars(base)):
        value = get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if re.fullmatch(r"(attn|attention|expert|moe)_layer_period", name):
            kwargs[name] = 2  # hybrids: attention (or experts) in the second of the two layers
        elif re.fullmatch(r"(attn|attention|expert|moe)_layer_offset", name):
            kwargs[name] = 1
        elif re.fullmatch(r"(mamba_|ssm_|linear_)?expand", name) and value > 1:
            kwargs[name] = 1
        elif re.fullmatch(r"(mamba_|ssm_|linear_)(n_heads|num_heads)", name):
            kwargs[name] = 4
        elif re.fullmatch(r"(mamba_|ssm_|linear_)(d_head|head_dim|key_head_dim|value_head_dim)", name):
            kwargs[name] = 12
        elif name in ("rotary_dim", "rotary_emb_dim") and value > HEAD_DIM:
            kwargs[name] = HEAD_DIM // 2
        elif name == "mamba_d_ssm":
            kwargs[name] = 48  # = mamba heads (4) x mamba head size (12) = hidden x expand (1)
        elif name == "num_kv_shared_layers":
            kwargs[name] = 0
    for name in ("attn_layer_indices", "attention_layer_indices", "attn_layer_ids", "full_attn_idxs"):
        if has(name) and (get(name) is None or isinstance(get(name), (list, tuple))):
            kwargs[name] = [1]  # hybrids listing their attention layers: the second of the two
    for name in ("n_groups", "mamba_n_groups", "ssm_n_groups"):
        if isinstance(get(name), int) and get(name) > 1:
            kwargs[name] = 1
    if any(kwargs.get(n) for n in _EXPERT_NAMES):
        for name in _TOPK_NAMES:
            if has(name) and get(name) is None:
                kwargs[name] = 2
        for name in ("n_shared_experts", "num_shared_experts"):
            if has(name) and get(name) is None:
                kwargs[name] = 1
    if has("block_auto_adjust_ff_dim"):
        kwargs["block_auto_adjust_ff_dim"] = False  # FFN width exactly the configured one
    kwargs.update(_SPECIAL.get(get("model_type"), {}))
    for name in getattr(base, "sub_configs", {}):
        current = get(name)
        if current is None or not hasattr(current, "to_dict"):
            continue
        sub_kwargs = _tiny_overrides(current, full_subconfigs)
        if full_subconfigs:
            sub_kwargs = {**current.to_dict(), **sub_kwargs}
        sub_kwargs["model_type"] = getattr(current, "model_type", "")
        kwargs[name] = sub_kwargs
    return kwargs


def tiny_config(arch: str, full_subconfigs: bool = False):
    """The tiny configuration of ``arch`` (a key of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch]
    base = cls()
    kwargs = _tiny_overrides(base, full_subconfigs)
    accepted = pyinspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        return cls(**kwargs)
    except Exception as exc:
        kv = _attr_name(base, "num_key_value_heads")
        if "num_key_value_heads" not in str(exc) or kwargs.get(kv) in (None, HEADS):
            raise
        kwargs[kv] = HEADS  # a config that only takes multi-head attention
        return cls(**kwargs)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Add a little noise to every floating parameter: norms and biases stop being all ones and zeros."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                scale = 0.1 if param.dim() <= 1 else 0.02
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def build(arch: str, seed: int = 0):
    """``(model, config, attn_implementation)``: the tiny float32 model of ``arch`` in eval mode."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model = None
    for full_subconfigs in (False, True):
        try:
            config = tiny_config(arch, full_subconfigs)
            for implementation in ("sdpa", "eager"):
                torch.manual_seed(seed)
                try:
                    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation,
                                                             dtype=torch.float32)
                    break
                except (ValueError, ImportError) as exc:
                    if implementation == "eager" or "attn_implementation" not in str(exc) and (
                            "sdpa" not in str(exc).lower()):
                        raise
            break
        except Exception:
            if full_subconfigs or not getattr(CONFIG_MAPPING[arch], "sub_configs", None):
                raise
    model.float().eval()
    languages = getattr(config, "languages", None)
    if callable(getattr(model, "set_default_language", None)) and languages:
        model.set_default_language(languages[0])  # X-MOD: adapters per language
    _perturb(model, seed)
    return model, config, implementation


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def vocab_of(config) -> int:
    return int(getattr(text_config(config), "vocab_size", None) or VOCAB)


def random_ids(config, shape=CHECK_SHAPE, seed: int = 1) -> torch.Tensor:
    """Token ids in ``[4, vocab)``: away from the special ids the tiny config moved below 4."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, max(vocab_of(config), 5), shape, generator=generator)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if _takes_use_cache(model) else model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits.detach().clone()


def _takes_use_cache(model) -> bool:
    try:
        parameters = pyinspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------- where softmax attention runs


class _AttentionProbe(torch.overrides.TorchFunctionMode):
    """Records the attention module each softmax attention (SDPA, flex, or a softmax over the key axis) ran in."""

    def __init__(self, stack: list[str], seq: int):
        super().__init__()
        self.stack, self.seq, self.calls = stack, seq, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("scaled_dot_product_attention", "flex_attention"):
            self.calls.append((self._owner(), name))
        elif name in ("softmax", "_softmax", "log_softmax") and args and isinstance(args[0], torch.Tensor):
            dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
            tensor = args[0]
            # over the key axis: the sequence, plus a few sink / memory / prompt slots at most
            if tensor.dim() >= 3 and isinstance(dim, int) and self.seq <= tensor.shape[dim] <= self.seq + 64:
                self.calls.append((self._owner(), "softmax"))
        return func(*args, **kwargs)

    def _owner(self) -> str:
        for path, cls_name in reversed(self.stack):
            if "attention" in cls_name.lower() or "attn" in cls_name.lower():
                return path
        return self.stack[-1][0] if self.stack else ""


def attention_modules(model, config) -> dict[str, str]:
    """Module path -> ``"Class (kind)"`` of every module where a softmax attention ran in one forward, in order."""
    names = {id(m): (name, type(m).__name__) for name, m in model.named_modules()}
    stack: list = []

    def pre(module, args):
        if id(module) in names:
            stack.append(names[id(module)])

    def post(module, args, output):
        if id(module) in names and stack:
            stack.pop()

    probe = _AttentionProbe(stack, PROBE_LEN)
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        with probe:
            logits_of(model, random_ids(config, (1, PROBE_LEN), seed=2))
    finally:
        for handle in handles:
            handle.remove()
    classes = {name: cls_name for name, cls_name in names.values()}
    found: dict[str, set[str]] = {}
    for owner, kind in probe.calls:
        found.setdefault(owner, set()).add("SDPA" if kind == "scaled_dot_product_attention" else kind)
    return {path: f"{classes.get(path, '?')} ({', '.join(sorted(kinds))})" for path, kinds in found.items()}


# ---------------------------------------------------------------- what inspect should find


def _first(config, names, default=None):
    for name in names:
        try:
            value = getattr(config, _attr_name(config, name), None)
        except Exception:  # noqa: BLE001 - a per-layer attribute that refuses a global read: unknown
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _is_moe(config) -> bool:
    return any(isinstance(getattr(config, n, None), int) and getattr(config, n) > 1 for n in _EXPERT_NAMES)


def expected(config, attentions: dict[str, str]) -> dict:
    """Heads, KV heads, head sizes, FFN widths and layer count the config says (None: the config does not say)."""
    text = text_config(config)
    heads = _first(text, ("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads"))
    kv = _first(text, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    if kv is None:
        try:
            kv = 1 if getattr(text, "multi_query", False) is True else heads
        except Exception:  # noqa: BLE001
            kv = heads
    hidden = _first(text, ("hidden_size", "n_embd", "d_model", "embed_dim", "dim"))
    head_dims = {d for d in (_first(text, ("head_dim", "attention_head_dim", "kv_channels", "d_head")),
                             _first(text, ("v_head_dim",)), _first(text, ("global_head_dim",)))
                 if isinstance(d, int)}
    nope, rope = _first(text, ("qk_nope_head_dim",)), _first(text, ("qk_rope_head_dim",))
    if isinstance(nope, int) and isinstance(rope, int):
        head_dims.add(nope + rope)
    if not head_dims and heads and hidden:
        head_dims.add(hidden // heads)
    widths = set()
    for k, v in vars(text).items():
        if "intermediate" in k or "ffn" in k or k in ("n_inner", "d_ff", "dff", "dim_ff", "expert_dim", "d_inner"):
            # an int, or one per layer (Gemma 3n's intermediate_size list)
            values = v if isinstance(v, (list, tuple)) else [v]
            widths |= {w for w in values if isinstance(w, int) and not isinstance(w, bool) and w > 0}
    widths |= {w // 2 for w in widths if w % 2 == 0}  # a width that counts gate and up together
    if hidden:
        widths.add(4 * hidden)
    layers = _first(text, _LAYER_NAMES)
    also: dict[str, set] = {"heads": set(), "kv_heads": set()}
    if getattr(text, "is_heterogeneous", False):  # per-layer configs (Gemma 4's full-attention layers: head size 512)
        for layer in text.per_layer_config:
            also["heads"].add(_first(layer, _NAMES[HEADS][:1]))
            also["kv_heads"].add(_first(layer, _NAMES[KV_HEADS][:1]))
            head_dims.add(_first(layer, ("head_dim",)))
    for key, values in _EXPECT_ALSO.get(getattr(config, "model_type", ""), {}).items():
        also[key].update(values)
    return {"heads": heads, "kv_heads": kv, "head_dims": {d for d in head_dims if isinstance(d, int)},
            "widths": widths, "layers": layers, "attentions": attentions, "moe": _is_moe(text),
            "heads_also": {h for h in also["heads"] if isinstance(h, int)},
            "kv_heads_also": {h for h in also["kv_heads"] if isinstance(h, int)}}


def check_structure(structure, want: dict) -> list[str]:
    """What ``structure`` gets wrong against ``want`` (empty: it matches)."""
    problems = []
    attentions = [b for b in structure.blocks if b.attention is not None]
    ffns = [b for b in structure.blocks if b.ffn is not None]
    if len(attentions) != len(want["attentions"]):
        paths = [p.path for b in attentions for p in b.attention.projections().values()]
        owners = [owner for owner in want["attentions"] if not any(p.startswith(owner + ".") for p in paths)]
        missed = sorted({want["attentions"][owner] for owner in owners})
        why = next((r for owner in owners for p, r in getattr(structure, "reasons", {}).items()
                    if p.startswith(owner + ".")), "")
        why = why if len(why) <= 140 else why[:137] + "..."
        problems.append(f"{len(attentions)} of {len(want['attentions'])} attentions found"
                        + (f", not {'; '.join(missed)}" if missed else "") + (f" ({why})" if why else ""))
    for block in attentions:
        a = block.attention
        if want["heads"] is not None and a.num_heads not in {want["heads"], *want.get("heads_also", ())}:
            problems.append(f"block {block.index}: {a.num_heads} heads, config {want['heads']}")
        if want["kv_heads"] is not None and a.num_kv_heads not in {want["kv_heads"], *want.get("kv_heads_also", ())}:
            problems.append(f"block {block.index}: {a.num_kv_heads} KV heads, config {want['kv_heads']}")
        if want["head_dims"] and a.head_dim not in want["head_dims"]:
            problems.append(f"block {block.index}: head size {a.head_dim}, config {sorted(want['head_dims'])}")
    for block in ffns:
        if want["widths"] and block.ffn.channels not in want["widths"]:
            problems.append(f"block {block.index}: {block.ffn.channels} FFN channels, config {sorted(want['widths'])}")
    dense_layers = want["layers"] if not want["moe"] and len(want["attentions"]) == want["layers"] else None
    if dense_layers is not None and len(ffns) != dense_layers:
        problems.append(f"{len(ffns)} FFNs found in {dense_layers} dense layers")
    return problems


# ---------------------------------------------------------------- one architecture


def one_line(exc: BaseException, limit: int = 220) -> str:
    """``Type: first line of the message`` cut to ``limit`` characters, with known export errors named."""
    while isinstance(exc.__cause__, Exception) and (str(exc).strip().splitlines() or [""])[0].endswith(":"):
        exc = exc.__cause__  # a wrapper whose first line only introduces its cause
    text = str(exc).strip()
    known = (
        ("GuardOnDataDependentSymNode", "data-dependent control flow"),
        ("Could not guard on data-dependent", "data-dependent control flow"),
        ("data-dependent", "data-dependent control flow"),
        ("Dynamic control flow is not supported", "data-dependent control flow"),
        ("Unsupported: ", "unsupported Python construct in torch.export"),
    )
    prefix = ""
    for needle, name in known:
        if needle in text:
            prefix = f"{name}: "
            break
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = re.sub(r"pass '(\w+)' failed \(after \[[^\]]*\]\): ", r"\1: ", first)
    line = f"{prefix}{type(exc).__name__}: {first}" if first else f"{prefix}{type(exc).__name__}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_arch(arch: str, timeout: float = TIMEOUT, progress=None, seed: int = 0) -> dict:
    """One architecture through build, capture, inspect, S²FT and merge: a row of the table."""
    import fxsparse
    from fxsparse.capture import capture
    from fxsparse.passes.find_structure import find_structure

    started = time.perf_counter()
    row = {"arch": arch, "status": "pass", "stage": "pass", "reason": "", "notes": "", "seconds": 0.0}
    notes: list[str] = []
    stage = "build"

    def enter(name: str):
        nonlocal stage
        stage = name
        if progress is not None:
            progress(name)

    def timed_out():
        row.update(status="fail" if stage != "build" else "cannot-build", stage=stage,
                   reason=f"timed out after {timeout:.0f} s of CPU in {stage}")

    def run_stages():
        first_failure: Stop | None = None
        try:
            _reset(seed)
            enter("build")
            try:
                model, config, implementation = build(arch, seed)
            except Exception as exc:
                raise Stop("build", one_line(exc), "cannot-build") from None
            try:
                ids = random_ids(config)
                before = logits_of(model, ids)
                attentions = attention_modules(model, config)
            except Exception as exc:
                raise Stop("build", "forward on token ids: " + one_line(exc), "cannot-build") from None
            if not torch.isfinite(before).all():
                raise Stop("build", "the tiny model's logits are not finite", "cannot-build")
            if not attentions:
                raise Stop("build", "no softmax attention runs in the forward", "out-of-scope")
            notes.append(f"{implementation}")
            original_state = _state(model)

            enter("capture")
            try:
                captured = capture(model)
            except Exception as exc:
                raise Stop("capture", one_line(exc.__cause__ or exc)) from None
            fallback = getattr(captured, "fallback", "")
            if fallback:
                notes.append(f"capture fallback: {fallback}")

            enter("inspect")  # what fxsparse.inspect(model) does, on the graph just captured
            structure = None
            try:
                structure = find_structure(captured=captured).outputs["structure"]
            except Exception as exc:
                first_failure = Stop("inspect", one_line(exc))
            if structure is not None:
                problems = check_structure(structure, expected(config, attentions))
                dense = len(structure.unrecognized)
                if dense:
                    notes.append(f"{dense} linear(s) left dense")
                if problems:
                    first_failure = Stop("inspect", "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))

            enter("s2ft")
            roles = sorted({role for block in (structure.blocks if structure is not None else ())
                            for role in block.projections()})
            if not roles:
                raise first_failure or Stop("s2ft", "inspect found no attention or FFN projection to select")
            try:
                fxsparse.transform(model, "s2ft", ratios={r: RATIOS[r] for r in roles if r in RATIOS}, layers=None,
                                   verify=False, seed=seed)
            except Exception as exc:
                raise first_failure or Stop("s2ft", "transform: " + one_line(exc)) from None
            error = relative_error(logits_of(model, ids), before)
            if error > EXACT:
                raise Stop("s2ft", f"S²FT changed the logits: relative error {error:.1e}", "inexact")

            enter("merge")
            try:
                fxsparse.merge(model)
            except Exception as exc:
                raise first_failure or Stop("merge", "merge: " + one_line(exc)) from None
            merged = _state(model)
            if set(merged) != set(original_state):
                missing = sorted(set(original_state) ^ set(merged))[:2]
                raise Stop("merge", f"merged state dict keys differ from the original ({missing})", "inexact")
            worst = max((relative_error(merged[k].double(), v.double()) for k, v in original_state.items()
                         if v.is_floating_point() and v.numel() and v.norm() > 0), default=0.0)
            error = relative_error(logits_of(model, ids), before)
            if error > EXACT or worst > EXACT:
                raise Stop("merge", f"merge changed the model: logits {error:.1e}, weights {worst:.1e}", "inexact")
            if first_failure is not None:
                raise first_failure
        except Stop as stop:
            row.update(status=stop.status, stage=stop.stage, reason=stop.reason)
        except ArchTimeout:
            limit.landed = True
            timed_out()
        except Exception as exc:  # a harness error: still one line, named as such
            row.update(status="fail", stage=stage, reason=f"harness error in {stage}: {one_line(exc)}")

    # CPU time of this process, not wall time: a loaded machine must not turn slow into "timed out"
    limit = _CpuLimit(timeout)
    try:
        with limit:
            run_stages()
    except ArchTimeout:  # landed while a handler of run_stages ran, before the limit was disarmed
        timed_out()
    row["notes"] = "; ".join(notes)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _reset(seed: int) -> None:
    torch.manual_seed(seed)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---------------------------------------------------------------- workers


def _quiet(verbose: bool, redirect: bool) -> None:
    """Silence the models' warnings and prints (not with ``verbose``); ``redirect``: stdout/stderr to /dev/null too."""
    if verbose:
        return
    warnings.filterwarnings("ignore")
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
    if redirect:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def _worker(conn, timeout: float, verbose: bool) -> None:
    _quiet(verbose, redirect=True)
    torch.set_num_threads(1)
    while True:
        arch = conn.recv()
        if arch is None:
            return
        try:
            row = run_arch(arch, timeout, progress=lambda s, a=arch: conn.send(("stage", a, s)))
        except BaseException as exc:  # noqa: BLE001 - the worker must answer
            row = {"arch": arch, "status": "fail", "stage": "build", "reason": f"harness error: {one_line(exc)}",
                   "notes": "", "seconds": 0.0}
            traceback.print_exc()
        conn.send(("done", arch, row))


class _Worker:
    def __init__(self, ctx, timeout: float, verbose: bool):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, timeout, verbose), daemon=True)
        self.process.start()
        child.close()
        self.arch, self.stage, self.started, self.done = None, "build", 0.0, 0

    def give(self, arch: str) -> None:
        self.arch, self.stage, self.started = arch, "build", time.monotonic()
        self.conn.send(arch)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def run_zoo(archs: list[str], jobs: int, timeout: float, verbose: bool = False, log=print) -> list[dict]:
    """Rows for ``archs``, ``jobs`` worker processes at a time (0: in this process)."""
    rows: dict[str, dict] = {}
    if jobs <= 0:
        _quiet(verbose, redirect=False)
        for arch in archs:
            rows[arch] = run_arch(arch, timeout)
            log(_format(rows[arch]))
        return [rows[a] for a in archs]
    ctx = multiprocessing.get_context("spawn")
    pending = list(archs)
    hard = 6 * timeout  # wall time; the worker's own CPU-time alarm fires first unless C code hangs
    workers = [_Worker(ctx, timeout, verbose) for _ in range(min(jobs, len(archs)))]
    recycle_after = 20
    try:
        for worker in workers:
            if pending:
                worker.give(pending.pop(0))
        while any(w.arch is not None for w in workers):
            ready = wait([w.conn for w in workers if w.arch is not None], timeout=1.0)
            for i, worker in enumerate(workers):
                if worker.arch is None:
                    continue
                finished = None
                if worker.conn in ready:
                    try:
                        while worker.conn.poll():
                            kind, arch, payload = worker.conn.recv()
                            if kind == "stage":
                                worker.stage = payload
                            else:
                                finished = payload
                    except (EOFError, OSError):
                        finished = {"arch": worker.arch, "status": "fail", "stage": worker.stage,
                                    "reason": f"the worker process died in {worker.stage} (crash in native code)",
                                    "notes": "", "seconds": round(time.monotonic() - worker.started, 1)}
                elif time.monotonic() - worker.started > hard:
                    finished = {"arch": worker.arch, "status": "fail" if worker.stage != "build" else "cannot-build",
                                "stage": worker.stage, "reason": f"hung in {worker.stage} (killed after {hard:.0f} s)",
                                "notes": "", "seconds": round(time.monotonic() - worker.started, 1)}
                if finished is None:
                    continue
                rows[worker.arch] = finished
                log(_format(finished))
                worker.done += 1
                worker.arch = None
                # a timeout may have interrupted an import half-way: that process is not trusted again
                healthy = worker.process.is_alive() and not any(
                    text in finished["reason"] for text in ("worker process died", "hung in", "timed out"))
                if not healthy or worker.done >= recycle_after:
                    if healthy:
                        worker.stop()
                    else:
                        worker.process.kill()
                        worker.process.join()
                    workers[i] = worker = _Worker(ctx, timeout, verbose)
                if pending:
                    worker.give(pending.pop(0))
    finally:
        for worker in workers:
            worker.stop()
    return [rows[a] for a in archs if a in rows]


def _format(row: dict) -> str:
    reason = f"  {row['reason']}" if row["reason"] else ""
    notes = f"  [{row['notes']}]" if row.get("notes") else ""
    return f"{row['arch']:<28} {row['status']:<13} {row['stage']:<8} {row['seconds']:>5}s{reason}{notes}"


# ---------------------------------------------------------------- results


def counts(rows: list[dict]) -> dict[str, int]:
    c = {k: 0 for k in ("architectures", "cannot-build", "out-of-scope", "in scope", "pass", "fail", "inexact")}
    c["architectures"] = len(rows)
    for row in rows:
        c[row["status"]] = c.get(row["status"], 0) + 1
        if row["status"] in IN_SCOPE:
            c["in scope"] += 1
    return c


def summary_line(c: dict[str, int]) -> str:
    share = 100 * c["pass"] / max(c["in scope"], 1)
    return (f"{c['architectures']} architectures: {c['in scope']} in scope, {c['pass']} pass ({share:.0f}%), "
            f"{c['fail']} fail, {c['inexact']} inexact; {c['out-of-scope']} out of scope, "
            f"{c['cannot-build']} cannot be built tiny")


def write_results(rows: list[dict], elapsed: float, jobs: int) -> None:
    import transformers

    RESULTS.mkdir(parents=True, exist_ok=True)
    with CSV_PATH.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    c = counts(rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# The transformers zoo: inspect, S²FT and merge on every causal-LM architecture",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}, {date}, {cpu_name()}, "
        f"git {git_rev()}, {jobs} worker(s), {elapsed / 60:.1f} min. Written by `python benchmarks/zoo.py` "
        "(see its docstring for what each stage checks).",
        "",
        f"**{summary_line(c)}.**",
        "",
        "Status: `pass` (inspect matches the config, S²FT with every projection selected and merge are exact), "
        "`fail` (stopped at `stage`), `inexact` (a function changed: never acceptable), `out-of-scope` (no softmax "
        "attention), `cannot-build` (no tiny model runs on token ids). A projection left dense (notes) is a pass "
        "when the function is exact.",
        "",
        "| architecture | status | stage | reason | notes | s |",
        "|---|---|---|---|---|---|",
    ]
    order = {"inexact": 0, "fail": 1, "pass": 2, "out-of-scope": 3, "cannot-build": 4}
    for row in sorted(rows, key=lambda r: (order.get(r["status"], 9), STAGES.index(r["stage"])
                                           if r["stage"] in STAGES else 9, r["arch"])):
        reason = row["reason"].replace("|", "\\|").replace("\n", " ")
        notes = row["notes"].replace("|", "\\|")
        lines.append(f"| {row['arch']} | {row['status']} | {row['stage']} | {reason} | {notes} | {row['seconds']} |")
    MD_PATH.write_text("\n".join(lines) + "\n")


def read_results(path: Path = CSV_PATH) -> dict[str, dict]:
    """The committed rows, by architecture."""
    with path.open(newline="") as handle:
        return {row["arch"]: row for row in csv.DictReader(handle)}


def all_archs() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="", help="comma-separated architectures (default: the whole mapping)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (0: run in this process)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per architecture")
    parser.add_argument("--write", action="store_true", help="write the table even for a subset of --arch")
    parser.add_argument("-v", "--verbose", action="store_true", help="keep the models' own warnings and prints")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()] or all_archs()
    known = set(all_archs())
    unknown = [a for a in archs if a not in known]
    if unknown:
        parser.error(f"not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {unknown}")
    started = time.perf_counter()
    rows = run_zoo(archs, args.jobs, args.timeout, args.verbose)
    elapsed = time.perf_counter() - started
    print(summary_line(counts(rows)) + f" ({elapsed / 60:.1f} min)")
    if not args.arch or args.write:
        if args.arch and CSV_PATH.exists():  # a subset refreshes its rows in the full table
            merged = read_results()
            merged.update({r["arch"]: r for r in rows})
            rows = [merged[a] for a in all_archs() if a in merged]
        write_results(rows, elapsed, args.jobs)
        print(f"wrote {MD_PATH.relative_to(BENCHMARKS.parent)} and {CSV_PATH.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
