"""Pass: replace each unfused gated FFN module by :class:`~fxsparse.layers.fused_ffn.FusedGatedFFN`.

For every block whose FFN is gated (``ffn.gate is not None``) with separate gate/up modules, the
module that owns gate, up and down (their common parent path, e.g. ``model.layers.3.mlp``) is swapped
for a ``FusedGatedFFN`` holding the *same* gate/up/down submodules under the same attribute names, so
parameters and ``state_dict`` keys do not change. Each swap happens only after the new module gave the
old module's output on a random input; a block that fails (or cannot be checked) is left as it was and
named in ``PassResult.info``.

>>> from fxsparse.models import tiny_model
>>> from fxsparse.structure import Block, FFN, Projection, Structure
>>> model = tiny_model("llama")
>>> mlp = "model.layers.{}.mlp.{}_proj"
>>> blocks = [Block(i, None, FFN(Projection(mlp.format(i, "up")), Projection(mlp.format(i, "gate")),
...                          Projection(mlp.format(i, "down")), 80, "silu")) for i in range(2)]
>>> fuse_gated_ffn(model, Structure(blocks)).modified
True
>>> type(model.model.layers[0].mlp).__name__
'FusedGatedFFN'
"""

from __future__ import annotations

import torch
from torch import nn

from fxsparse.layers.fused_ffn import FusedGatedFFN, activation_name
from fxsparse.passes.manager import PassResult
from fxsparse.structure import Structure

__all__ = ["fuse_gated_ffn"]

# Attribute names under which transformers models keep their FFN activation module.
_ACT_ATTRS = ("act_fn", "activation_fn", "act", "activation")


def _parent_and_name(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _find_activation(owner: nn.Module, hint: str) -> str | None:
    for attr in _ACT_ATTRS:
        module = getattr(owner, attr, None)
        if isinstance(module, nn.Module):
            found = activation_name(hint, module)
            if found is not None:
                return found
    return activation_name(hint)


def _same_output(old: nn.Module, new: nn.Module, in_features: int, ref: torch.Tensor) -> str | None:
    """None if ``new`` computes ``old``'s output on a random input, else why not."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, in_features, generator=generator, dtype=torch.float32).to(ref.device, ref.dtype)
    with torch.no_grad():
        try:
            expected, got = old(x), new(x)
        except Exception as exc:  # a module with an unusual forward signature: report, do not guess
            return f"check failed to run ({type(exc).__name__}: {exc})"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "output shape differs"
    # Exact module swap: the same ops in the same order, so only float rounding may differ.
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(ref.dtype, 1e-2)
    if not torch.allclose(got, expected, rtol=tol, atol=tol * expected.abs().max().item()):
        return f"output differs (max abs diff {(got - expected).abs().max().item():.3g})"
    return None


def fuse_gated_ffn(model: nn.Module, structure: Structure) -> PassResult:
    """Swap every unfused gated FFN of ``structure`` in ``model`` for a ``FusedGatedFFN`` (in place).

    Returns ``PassResult(modified, info)``; ``info`` counts the fused blocks and names each block left
    alone with the reason.
    """
    fused: list[int] = []
    skipped: list[str] = []
    for block in structure.blocks:
        ffn = block.ffn
        if ffn is None or ffn.gate is None:
            continue
        if ffn.gate.fused or ffn.up.fused or ffn.gate.path == ffn.up.path:
            skipped.append(f"block {block.index}: gate and up share one module ({ffn.up.path})")
            continue
        reason = _fuse_one(model, ffn)
        if reason is None:
            fused.append(block.index)
        else:
            skipped.append(f"block {block.index}: {reason}")
    info = f"fused {len(fused)} gated FFN(s)"
    if skipped:
        info += "; left unfused: " + "; ".join(skipped)
    return PassResult(modified=bool(fused), info=info)


def _fuse_one(model: nn.Module, ffn) -> str | None:
    paths = (ffn.gate.path, ffn.up.path, ffn.down.path)
    parents_names = [_parent_and_name(p) for p in paths]
    owner_path = parents_names[0][0]
    if any(parent != owner_path for parent, _ in parents_names) or not owner_path:
        return f"gate/up/down are not children of one module ({', '.join(paths)})"
    owner = model.get_submodule(owner_path)
    if isinstance(owner, FusedGatedFFN):
        return f"{owner_path} is already fused"
    names = tuple(name for _, name in parents_names)
    activation = _find_activation(owner, ffn.activation)
    if activation is None:
        return f"unsupported activation {ffn.activation!r} in {owner_path}"
    gate, up, down = (getattr(owner, name) for name in names)
    new = FusedGatedFFN(gate, up, down, activation, names=names)
    old_keys, new_keys = set(owner.state_dict()), set(new.state_dict())
    if old_keys != new_keys:
        return f"{owner_path} holds more than gate/up/down (state_dict keys {sorted(old_keys - new_keys)})"
    ref = next(gate.parameters(), None)
    if ref is None or ref.device.type == "meta":
        return f"cannot check {owner_path} numerically (no parameters or on the meta device)"
    in_features = getattr(gate, "in_features", None) or getattr(gate, "nx", None) or ref.shape[-1]
    reason = _same_output(owner, new, in_features, ref)
    if reason is not None:
        return f"{owner_path}: {reason}"
    new.train(owner.training)
    parent_path, attr = _parent_and_name(owner_path)
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return None
