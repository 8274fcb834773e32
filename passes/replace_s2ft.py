"""Pass: replace each projection with selected units by an :class:`~fxsparse.layers.s2ft.S2FTLinear`.

After ``permute_coupled`` the selected units of a projection sit at known rows (q, k, v, gate, up) or
columns (o, down) of its weight; each such module becomes an ``S2FTLinear`` whose trainable block, a
real ``nn.Parameter``, holds exactly those rows/columns. Every other parameter of the model is frozen.
Fused modules (one qkv or gate_up linear) train the rows of all their selected roles as one block.
"""

from __future__ import annotations

from torch import nn

from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.passes.permute_coupled import BlockPermutation, permuted_module_indices
from fxsparse.plan import Plan
from fxsparse.structure import Structure

__all__ = ["replace_s2ft", "trained_slices"]


def trained_slices(structure: Structure, plan: Plan, perms: dict[int, BlockPermutation]
                   ) -> dict[str, tuple[int, list[int], list[int]]]:
    """Module path -> (dim, trained rows/columns after the permutation, original row/column of each).

    ``ValueError`` when one module would train rows for one role and columns for another.
    """
    by_path: dict[str, tuple[int, list[int], list[int]]] = {}
    for (block, role), (path, dim, rows, origin) in permuted_module_indices(structure, plan, perms).items():
        if path in by_path:
            # fused projections: q and v rows of one qkv linear train as one block of rows
            prev_dim, prev_rows, prev_origin = by_path[path]
            if prev_dim != dim:
                raise ValueError(f"{path} would train rows and columns at once (block {block}, {role})")
            pairs = sorted(set(zip(prev_rows + rows, prev_origin + origin)))
            by_path[path] = (dim, [p for p, _ in pairs], [o for _, o in pairs])
        else:
            by_path[path] = (dim, rows, origin)
    return by_path


@fxpass(reads=("model", "structure", "plan", "perms"), writes=("model", "replaced", "requires_grad_before"))
def replace_s2ft(model: nn.Module, structure: Structure, plan: Plan, perms: dict[int, BlockPermutation]
                 ) -> PassResult:
    """Swap the projections with selected units for ``S2FTLinear`` layers and freeze everything else.

    Writes ``replaced`` (path -> (dim, rows, original rows), what adapters store) and
    ``requires_grad_before`` (each parameter's flag before, what a merge restores).

    >>> import fxsparse
    >>> from fxsparse.models import tiny_model
    >>> from fxsparse.plan import arch_of
    >>> model = tiny_model("llama")
    >>> structure = fxsparse.inspect(model)
    >>> plan = Plan(units={0: {"o": [2]}, 1: {"o": [0, 5]}}, ratios={}, select="random", seed=0,
    ...             arch=arch_of(structure))
    >>> result = replace_s2ft(model=model, structure=structure, plan=plan, perms={})
    >>> type(model.model.layers[0].self_attn.o_proj).__name__, result.info
    ('S2FTLinear', 'replaced 2 projections')
    >>> [name for name, p in model.named_parameters() if p.requires_grad]
    ['model.layers.0.self_attn.o_proj.block', 'model.layers.1.self_attn.o_proj.block']
    """
    slices = trained_slices(structure, plan, perms)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    for path, (dim, rows, origin) in slices.items():
        model.set_submodule(path, S2FTLinear.from_linear(model.get_submodule(path), dim=dim, index=rows,
                                                         origin=origin))
    return PassResult(bool(slices), f"replaced {len(slices)} projections",
                      outputs={"model": model, "replaced": slices, "requires_grad_before": flags})
