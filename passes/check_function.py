"""Pass: check that the transformed model computes what the original did, unit by unit.

``record_reference`` (before any pass changes the model) runs the captured small example once and keeps
the output of every *closing* projection — o of each attention, down of each FFN — and the final
output. These are exactly the tensors a co-permutation and an S²FT split leave unchanged. This pass
runs the example again through the transformed model with each closing projection's output replaced
by its reference after it is compared (teacher forcing), so every attention and FFN is checked on
exactly the inputs it had before and its error is its own rounding, not the sum of the blocks before
it. A unit that differs by more than the tolerance of its dtype raises :class:`FunctionChangedError`
naming it; ``fxsparse.transform`` then puts the model back as it was.

Tolerances (relative L2 error of a unit's output, teacher-forced). Measured worst cases of S²FT on the
development CPU — 7 tiny families (LLaMA, Qwen3, Gemma, Phi-3, GPT-NeoX, GPT-2, OPT) x 3 seeds and
SmolLM2-135M with the paper's ratios and with every role selected: float32 5.7e-7, float16 6.1e-4,
bfloat16 4.8e-3 (without teacher forcing SmolLM2's bfloat16 logits differ by 18% after 30 blocks, which
is why a single end-to-end threshold cannot work). The tolerances leave a margin of 6x or more. A
float32 model on CUDA whose matmuls may run in TF32 (``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision("high")``, a 10-bit mantissa like float16) gets the float16
tolerance, and with precision ``"medium"`` (bfloat16 inside) the bfloat16 one: derived from the mantissa
widths, not measured here (no GPU on the development machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fxsparse.capture import Captured
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.structure import Structure

__all__ = ["check_function", "Reference", "FunctionChangedError", "TOLERANCE", "closing_projections", "run_example",
           "relative_error", "tolerance"]

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,  # measured worst 5.7e-7
    torch.float16: 4e-3,  # measured worst 6.1e-4
    torch.bfloat16: 3e-2,  # measured worst 4.8e-3
}
_DEFAULT_TOLERANCE = 3e-2


class FunctionChangedError(RuntimeError):
    """The transformed model's output differs from the original's beyond the dtype's tolerance."""


@dataclass(frozen=True)
class Reference:
    """What ``record_reference`` keeps: the closing projections' outputs (per call) and the model output."""

    outputs: Mapping[str, tuple[torch.Tensor, ...]]
    output: torch.Tensor


def closing_projections(structure: Structure) -> dict[str, str]:
    """Module path of each attention's o and each FFN's down -> a description of the unit it closes."""
    closing = {}
    for block in structure.blocks:
        if block.attention is not None:
            a = block.attention
            closing[a.o.path] = (f"attention of block {block.index} (q {a.q.path}, k {a.k.path}, v {a.v.path}, "
                                 f"o {a.o.path})")
        if block.ffn is not None:
            f = block.ffn
            gate = f"gate {f.gate.path}, " if f.gate is not None else ""
            closing[f.down.path] = f"FFN of block {block.index} ({gate}up {f.up.path}, down {f.down.path})"
    return closing


def _output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def run_example(model: nn.Module, captured: Captured, paths, forced: Reference | None = None):
    """``(outputs per path, model output)`` of one forward on the captured example, in eval mode.

    With ``forced``, each path's output is replaced by the forced one after being recorded.
    """
    outputs: dict[str, list[torch.Tensor]] = {path: [] for path in paths}

    def make_hook(path: str):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return None
            outputs[path].append(output.detach().clone())
            if forced is not None:
                calls = forced.outputs.get(path, ())
                if len(outputs[path]) <= len(calls):
                    return calls[len(outputs[path]) - 1].clone()  # a later in-place op must not reach it
            return None
        return hook

    handles = [model.get_submodule(path).register_forward_hook(make_hook(path)) for path in paths]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = _output_tensor(model(*captured.args, **captured.kwargs)).detach().clone()
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {path: tuple(values) for path, values in outputs.items()}, result


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """``||got - reference|| / ||reference||`` over the reference's finite entries (inf if shapes differ or
    ``got`` is not finite where the reference is)."""
    if got.shape != reference.shape:
        return float("inf")
    finite = torch.isfinite(reference)
    got, reference = got.double()[finite], reference.double()[finite]
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return ((got - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def tolerance(tensor: torch.Tensor) -> float:
    """The relative error allowed for a unit whose output is ``tensor`` (its dtype, and TF32 on CUDA)."""
    dtype = tensor.dtype
    if dtype == torch.float32 and tensor.device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            dtype = torch.bfloat16
        elif precision == "high" or torch.backends.cuda.matmul.allow_tf32:
            dtype = torch.float16
    return TOLERANCE.get(dtype, _DEFAULT_TOLERANCE)


@fxpass(reads=("model", "structure", "captured", "reference"), writes=(), after_writes=("model",))
def check_function(model: nn.Module, structure: Structure, captured: Captured,
                   reference: Reference | None) -> PassResult:
    """Raise :class:`FunctionChangedError` naming every attention/FFN whose output changed (see the module).

    A ``reference`` of None (verify off, or a model on the meta device) skips the check.

    >>> import fxsparse, torch
    >>> from fxsparse.capture import capture
    >>> from fxsparse.models import tiny_model
    >>> from fxsparse.passes.record_reference import record_reference
    >>> model = tiny_model("llama")
    >>> captured = capture(model)
    >>> structure = fxsparse.inspect(model)
    >>> ref = record_reference(model=model, structure=structure, captured=captured).outputs["reference"]
    >>> check_function(model=model, structure=structure, captured=captured, reference=ref).info
    'checked 4 units and the output on a (1, 7) example'
    >>> with torch.no_grad():
    ...     model.model.layers[1].mlp.up_proj.weight[3] *= 2
    >>> try:
    ...     check_function(model=model, structure=structure, captured=captured, reference=ref)
    ... except FunctionChangedError as exc:
    ...     print(str(exc).split("): ")[-1])
    output of model.layers.1.mlp.down_proj differs by 1.12e-01 (tolerance 1e-05 for torch.float32)
    """
    if reference is None:
        return PassResult(False, "skipped (verify off or no real tensors)")
    closing = closing_projections(structure)
    outputs, output = run_example(model, captured, list(reference.outputs), forced=reference)
    failures = []
    for path, calls in reference.outputs.items():
        got = outputs.get(path, ())
        if len(got) != len(calls):
            failures.append(f"{closing.get(path, path)}: {path} ran {len(got)} times, before {len(calls)}")
            continue
        for want, have in zip(calls, got):
            error, limit = relative_error(have, want), tolerance(want)
            if error > limit:
                failures.append(f"{closing.get(path, path)}: output of {path} differs by {error:.2e} "
                                f"(tolerance {limit:.0e} for {want.dtype})")
                break
    error, limit = relative_error(output, reference.output), tolerance(reference.output)
    if error > limit:
        failures.append(f"the model output differs by {error:.2e} with every unit's output forced "
                        f"(tolerance {limit:.0e}): something outside the attention/FFN units changed")
    if failures:
        raise FunctionChangedError("the transformed model computes another function on the example input: "
                                   + "; ".join(failures))
    shape = tuple(captured.args[0].shape) if captured.args and isinstance(captured.args[0], torch.Tensor) else ""
    return PassResult(False, f"checked {len(reference.outputs)} units and the output on a {shape} example")
