"""S²FT adapters as standard PEFT LoRA adapters: every LoRA tool can load and serve an S²FT fine-tune.

An S²FT update is exactly a LoRA of rank k per trained projection, with scaling 1:

- trained input columns ``c_1..c_k`` (o, down): ``ΔW = ΔB · E`` with ``E`` (k, in) the one-hot selection
  of those columns, so LoRA ``A = E`` and ``B = ΔB`` (out, k), the trained columns minus their base values;
- trained output rows ``r_1..r_k`` (q, k, v, gate, up): ``ΔW = Eᵀ · ΔA``, so ``B = Eᵀ`` (out, k) one-hot
  and ``A = ΔA`` (k, in), the trained rows minus their base values.

:func:`export_lora` writes a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``
with PEFT's key names) in the model's *original* coordinates (the permutation undone): per-module ranks
through ``rank_pattern`` with ``alpha_pattern`` equal to them (scaling exactly 1), fused QKV / gate_up
linears as one LoRA on the fused module (rows of the fused weight), GPT-2 ``Conv1D`` with
``fan_in_fan_out``. ``peft.PeftModel.from_pretrained(base, folder)`` then computes the S²FT model's
function. ``uniform_rank=True`` pads every module to the largest rank with zeros (same function) for
servers that read only ``r`` and ``lora_alpha``.

Command line (``fxsparse export-lora``): a base model and an S²FT adapter folder in, a LoRA folder out.

>>> import fxsparse, tempfile, torch
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25, "down": 0.1})
>>> with torch.no_grad():
...     _ = model.model.layers[0].self_attn.o_proj.block.add_(0.1)
>>> folder = export_lora(model, tempfile.mkdtemp())
>>> sorted(p.name for p in folder.iterdir())
['adapter_config.json', 'adapter_model.safetensors']
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["export_lora", "lora_deltas", "add_parser", "run"]

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def lora_deltas(model: nn.Module) -> dict[str, tuple[int, list[int], torch.Tensor]]:
    """Module path -> (dim, trained rows/columns in the ORIGINAL numbering (sorted), trained minus base values).

    ``model`` is a transformed S²FT model; the delta has the block's shape ((k, in) rows for ``dim=0``,
    (out, k) columns for ``dim=1``), its rows/columns in the order of the returned index, in float32
    (float64 for a float64 model).
    """
    from fxsparse.recipes.s2ft import s2ft_state

    state = s2ft_state(model)
    deltas = {}
    for path, (dim, _rows, origin) in state.replaced.items():
        block = model.get_submodule(path).block.detach()
        base = state.base_blocks.get(path)
        if base is None or base.shape != block.shape:
            raise ValueError(f"the base values of {path} were not recorded at transform time: transform the model "
                             "again with this version of fxsparse (load_adapter does) before export_lora")
        wide = torch.float64 if block.dtype == torch.float64 else torch.float32
        delta = block.to("cpu", wide) - base.to(wide)
        order = sorted(range(len(origin)), key=origin.__getitem__)
        deltas[path] = (dim, sorted(origin), delta.index_select(dim, torch.tensor(order)).contiguous())
    return deltas


def _lora_pair(dim: int, index: list[int], delta: torch.Tensor, rank: int, in_features: int, out_features: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A (rank, in), lora_B (out, rank)) for one module; ranks past len(index) are zero."""
    k, positions, chosen = len(index), torch.arange(len(index)), torch.tensor(index)
    a = torch.zeros(rank, in_features, dtype=delta.dtype)
    b = torch.zeros(out_features, rank, dtype=delta.dtype)
    if dim == 1:  # columns: A = E selects them, B = their delta
        a[positions, chosen] = 1
        b[:, :k] = delta
    else:  # rows: A = their delta, B = E^T puts them back at their rows
        a[:k] = delta
        b[chosen, positions] = 1
    return a, b


def export_lora(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                uniform_rank: bool = False) -> Path:
    """Write the S²FT model's update as a PEFT LoRA adapter folder at ``path``; returns the folder.

    ``model``: a transformed (trained) S²FT model. ``base_model_name_or_path`` goes into the config (default:
    the model's own ``name_or_path``, else empty). ``uniform_rank``: one rank for every module (the largest,
    zero-padded) instead of ``rank_pattern``. The folder is written atomically (temporary folder, rename);
    an existing folder is replaced only if it holds nothing but a previous adapter.
    """
    from fxsparse.layers.s2ft import S2FTLinear

    if getattr(model, "_fxsparse_recipe", None) != "s2ft":
        raise ValueError("export_lora takes a model transformed with the s2ft recipe (or use "
                         "`fxsparse export-lora --model ... --adapter ...` with a saved S2FT adapter)")
    deltas = lora_deltas(model)
    if not deltas:
        raise ValueError("the S2FT model trains no projection: nothing to export")
    ranks = {p: len(index) for p, (_dim, index, _delta) in deltas.items()}
    rank = max(ranks.values())
    tensors, conv1d = {}, []
    for module_path, (dim, index, delta) in deltas.items():
        layer = model.get_submodule(module_path)
        if not isinstance(layer, S2FTLinear):
            raise ValueError(f"{module_path} is a {type(layer).__name__}, not an S2FTLinear")
        conv1d.append(layer.conv1d)
        a, b = _lora_pair(dim, index, delta, rank if uniform_rank else ranks[module_path], layer.in_features,
                          layer.out_features)
        tensors[f"base_model.model.{module_path}.lora_A.weight"] = a
        tensors[f"base_model.model.{module_path}.lora_B.weight"] = b
    if any(conv1d) and not all(conv1d):
        raise ValueError("the model mixes Conv1D and Linear projections: one fan_in_fan_out cannot describe both")
    if base_model_name_or_path is None:
        base_model_name_or_path = str(getattr(model, "name_or_path", "") or "")
    targets = sorted(deltas)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        # every module listed with its rank and alpha = rank: scaling alpha / r is exactly 1 everywhere
        "rank_pattern": {} if uniform_rank else {p: ranks[p] for p in targets},
        "alpha_pattern": {} if uniform_rank else {p: ranks[p] for p in targets},
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": bool(conv1d and all(conv1d)),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return _write_folder(Path(path), config, tensors)


def _write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        others = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        if others:
            raise ValueError(f"{folder} already holds {others[:5]}: give an empty or new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
        raise
    return folder


# ---- command line ------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fxsparse export-lora`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "export-lora", help="write an S2FT adapter as a PEFT LoRA adapter folder (PeftModel.from_pretrained)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="the base model: smollm2, a tiny preset (tiny-llama...) "
                   "or a folder")
    p.add_argument("--adapter", required=True, help="S2FT adapter folder (save_adapter / fxsparse finetune)")
    p.add_argument("--out", required=True, help="LoRA adapter folder to write")
    p.add_argument("--uniform-rank", action="store_true",
                   help="pad every module to the largest rank (for servers that ignore rank_pattern)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    """Load the base model, apply the S2FT adapter, export it as a LoRA folder; returns a summary."""
    import fxsparse
    from fxsparse.app.models import load_model

    model, _tokenizer = load_model(args.model)
    fxsparse.load_adapter(model, args.adapter)
    name = str(getattr(model, "name_or_path", "") or args.model)
    out = export_lora(model, args.out, base_model_name_or_path=name, uniform_rank=args.uniform_rank)
    config = json.loads((out / CONFIG_NAME).read_text())
    ranks = config["rank_pattern"] or {p: config["r"] for p in config["target_modules"]}
    print(f"LoRA adapter written to {out}: {len(ranks)} modules, ranks {min(ranks.values())}-{max(ranks.values())}")
    print(f"load it with: PeftModel.from_pretrained(base_model, {str(out)!r})")
    return {"out": str(out), "modules": len(ranks), "max_rank": config["r"]}
