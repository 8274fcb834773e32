"""Pass: record what ``check_function`` compares against, before any pass changes the model."""

from __future__ import annotations

from torch import nn

from fxsparse.capture import Captured
from fxsparse.passes.check_function import Reference, closing_projections, run_example
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.structure import Structure

__all__ = ["record_reference"]


@fxpass(reads=("model", "structure", "captured"), writes=("reference",), options=("verify",),
        before_writes=("model",))
def record_reference(model: nn.Module, structure: Structure, captured: Captured, verify: bool = True) -> PassResult:
    """Run the small example once and keep what ``check_function`` compares against.

    Keeps each attention's o output, each FFN's down output and the model output (a
    :class:`~fxsparse.passes.check_function.Reference`).

    Writes ``reference=None`` when ``verify`` is off or the model has no real tensors (meta device).

    >>> import fxsparse
    >>> from fxsparse.capture import capture
    >>> from fxsparse.models import tiny_model
    >>> model = tiny_model("llama")
    >>> result = record_reference(model=model, structure=fxsparse.inspect(model), captured=capture(model))
    >>> sorted(result.outputs["reference"].outputs)[:2]
    ['model.layers.0.mlp.down_proj', 'model.layers.0.self_attn.o_proj']
    """
    if not verify:
        return PassResult(False, "verify off", outputs={"reference": None})
    if any(p.device.type == "meta" for p in model.parameters()):
        return PassResult(False, "meta tensors: nothing to run", outputs={"reference": None})
    outputs, output = run_example(model, captured, list(closing_projections(structure)))
    reference = Reference(outputs={path: calls for path, calls in outputs.items() if calls}, output=output)
    return PassResult(False, f"{len(reference.outputs)} units", outputs={"reference": reference})
