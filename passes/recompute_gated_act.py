"""Pass: let gated FFNs recompute ``act(gate)`` in backward instead of keeping it.

For every block whose FFN is gated (``ffn.gate is not None``) with separate gate/up modules, the
module that owns gate, up and down (their common parent path, e.g. ``model.layers.3.mlp``) is swapped
for a :class:`~fxsparse.layers.recompute_ffn.RecomputingGatedFFN` holding the *same* gate/up/down
submodules under the same attribute names, so parameters and ``state_dict`` keys do not change. It saves
one (tokens x channels) tensor per block for backward and fuses nothing. Each swap happens only after
the new module gave the old module's output on a random input; a block that fails (or cannot be
checked) is left as it was and named in ``PassResult.info``.
"""

from __future__ import annotations

import torch
from torch import nn

from fxsparse.layers.recompute_ffn import RecomputingGatedFFN, activation_name
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.structure import Structure

__all__ = ["recompute_gated_act"]

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


@fxpass(reads=("model", "structure"), writes=("model", "recomputed"), options=("recompute_act",))
def recompute_gated_act(model: nn.Module, structure: Structure, recompute_act: bool = True) -> PassResult:
    """Swap every separate-module gated FFN of ``structure`` for a ``RecomputingGatedFFN`` (in place).

    Writes ``recomputed`` (owner path -> the original owner module, what a merge puts back); ``info``
    counts the swapped blocks and names each block left alone with the reason. ``recompute_act=False``
    changes nothing.

    >>> import fxsparse
    >>> from fxsparse.models import tiny_model
    >>> model = tiny_model("llama")
    >>> result = recompute_gated_act(model=model, structure=fxsparse.inspect(model))
    >>> result.info, type(model.model.layers[0].mlp).__name__
    ('recomputing act(gate) in 2 gated FFN(s)', 'RecomputingGatedFFN')
    >>> sorted(result.outputs["recomputed"])
    ['model.layers.0.mlp', 'model.layers.1.mlp']
    """
    if not recompute_act:
        return PassResult(False, "off", outputs={"model": model, "recomputed": {}})
    swapped: dict[str, nn.Module] = {}
    skipped: list[str] = []
    for block in structure.blocks:
        ffn = block.ffn
        if ffn is None or ffn.gate is None:
            continue
        if ffn.gate.fused or ffn.up.fused or ffn.gate.path == ffn.up.path:
            skipped.append(f"block {block.index}: gate and up share one module ({ffn.up.path})")
            continue
        owner_path, result = _swap_one(model, ffn)
        if isinstance(result, nn.Module):
            swapped[owner_path] = result
        else:
            skipped.append(f"block {block.index}: {result}")
    info = f"recomputing act(gate) in {len(swapped)} gated FFN(s)"
    if skipped:
        info += "; left alone: " + "; ".join(skipped)
    return PassResult(modified=bool(swapped), info=info, outputs={"model": model, "recomputed": swapped})


def _swap_one(model: nn.Module, ffn) -> tuple[str, nn.Module | str]:
    """(owner path, the original owner module once swapped, or why it was left alone)."""
    paths = (ffn.gate.path, ffn.up.path, ffn.down.path)
    parents_names = [_parent_and_name(p) for p in paths]
    owner_path = parents_names[0][0]
    if any(parent != owner_path for parent, _ in parents_names) or not owner_path:
        return owner_path, f"gate/up/down are not children of one module ({', '.join(paths)})"
    owner = model.get_submodule(owner_path)
    if isinstance(owner, RecomputingGatedFFN):
        return owner_path, f"{owner_path} already recomputes its activation"
    names = tuple(name for _, name in parents_names)
    activation = _find_activation(owner, ffn.activation)
    if activation is None:
        return owner_path, f"unsupported activation {ffn.activation!r} in {owner_path}"
    gate, up, down = (getattr(owner, name) for name in names)
    new = RecomputingGatedFFN(gate, up, down, activation, names=names)
    old_keys, new_keys = set(owner.state_dict()), set(new.state_dict())
    if old_keys != new_keys:
        return owner_path, (f"{owner_path} holds more than gate/up/down "
                            f"(state_dict keys {sorted(old_keys - new_keys)})")
    ref = next(gate.parameters(), None)
    if ref is None or ref.device.type == "meta":
        return owner_path, f"cannot check {owner_path} numerically (no parameters or on the meta device)"
    in_features = getattr(gate, "in_features", None) or getattr(gate, "nx", None) or ref.shape[-1]
    reason = _same_output(owner, new, in_features, ref)
    if reason is not None:
        return owner_path, f"{owner_path}: {reason}"
    new.train(owner.training)
    model.set_submodule(owner_path, new)
    return owner_path, owner
