"""S²FT kernels and ops: every kernel against a float64 reference (Triton interpreter on CPU), plus the ops.

Kernel tests force ``FXSPARSE_KERNELS=triton``: on CPU the kernels run in the interpreter (conftest sets
``TRITON_INTERPRET=1``). The reference is the same computation in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

import fxsparse
from fxsparse.codegen import s2ft as K
from fxsparse.codegen.autotune import Config, triton_available
from fxsparse.models import tiny_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# Per dtype: assert_close tolerances against the float64 reference. float32 accumulates exactly like the
# reference up to rounding (~1e-7 relative); bfloat16 rounds the result once (2^-8 relative), and the
# interpreter's bfloat16 store truncates instead of rounding, hence 2^-6.
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}
# Serving rounds twice in bfloat16, like any base-plus-adapter layer: the base GEMM's output (|y| up to ~40
# here), then that plus the delta; the absolute error follows the base output's size, not the result's.
# A wrong adapter, column or padding read shows as errors of the deltas' size (~1 to 6).
SERVING_TOLERANCES = {**TOLERANCES, torch.bfloat16: {"rtol": 1.6e-2, "atol": 0.1}}

# Awkward sizes: 42 tokens (two 32-token tiles, one partial), 123 inputs and 43 outputs (not multiples of any tile).
BATCH, IN, OUT = (2, 21), 123, 43
# name -> (positions along the split dim given its size, contiguous?)
LAYOUTS = {
    "span": lambda size: list(range(10, 27)),
    "span_at_start": lambda size: list(range(0, 33)),
    "span_at_end": lambda size: list(range(size - 5, size)),
    "gathered": lambda size: [3, 7, 8, 20, 40, size - 1],
}


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")


def _problem(dim: int, layout: str, dtype: torch.dtype, bias: bool, seed: int = 0, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    size = OUT if dim == 0 else IN
    index = torch.tensor(LAYOUTS[layout](size))
    sel, rest = K.index_lists(index, size)
    contiguous = index[-1] - index[0] + 1 == index.numel()
    start, stop = (int(index[0]), int(index[-1]) + 1) if contiguous else (-1, -1)
    weight = torch.randn(OUT, IN, generator=gen).index_fill_(dim, index, 0).to(dtype)
    block_shape = (index.numel(), IN) if dim == 0 else (OUT, index.numel())
    block = torch.randn(block_shape, generator=gen).to(dtype).requires_grad_(True)
    b = torch.randn(OUT, generator=gen).to(dtype) if bias else None
    x = torch.randn(*batch, IN, generator=gen).to(dtype).requires_grad_(True)
    grad_y = torch.randn(*batch, OUT, generator=gen).to(dtype)
    return dict(x=x, weight=weight, bias=b, block=block, index=index, sel=sel, rest=rest, dim=dim, start=start,
                stop=stop, grad_y=grad_y)


def _run(p):
    y = K.s2ft_linear(p["x"], p["weight"], p["bias"], p["block"], p["sel"], p["rest"], p["dim"], p["start"], p["stop"])
    dx, dblock = torch.autograd.grad(y, (p["x"], p["block"]), p["grad_y"])
    return y, dx, dblock


def _reference(p):
    x = p["x"].detach().double().requires_grad_(True)
    block = p["block"].detach().double().requires_grad_(True)
    bias = p["bias"].double() if p["bias"] is not None else None
    y = K.s2ft_reference(x, p["weight"].double(), bias, block, p["index"], p["dim"])
    dx, dblock = torch.autograd.grad(y, (x, block), p["grad_y"].double())
    return y, dx, dblock


def _assert_matches(got, expected, dtype):
    for name, a, b in zip(("y", "dx", "dblock"), got, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.double(), b, **TOLERANCES[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["span", "gathered"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_match_float64_reference(triton_kernels, dim, layout, dtype, bias):
    p = _problem(dim, layout, dtype, bias)
    before = K.launch_counts()
    got = _run(p)
    _assert_matches(got, _reference(p), dtype)
    after = K.launch_counts()
    forward, grad_input = ("s2ft_split_k", "s2ft_split_n") if dim == 1 else ("s2ft_split_n", "s2ft_split_k")
    assert after.get(forward, 0) > before.get(forward, 0)
    assert after.get(grad_input, 0) > before.get(grad_input, 0)
    assert after.get("s2ft_grad_block", 0) == before.get("s2ft_grad_block", 0) + 1


@pytest.mark.parametrize("layout", ["span_at_start", "span_at_end"])
@pytest.mark.parametrize("dim", [0, 1])
def test_block_at_either_end(triton_kernels, dim, layout):
    p = _problem(dim, layout, torch.float32, bias=True)
    _assert_matches(_run(p), _reference(p), torch.float32)


@pytest.mark.parametrize("dim", [0, 1])
def test_every_position_trainable(triton_kernels, dim):
    """The block covers the whole split dimension: no frozen range, an empty complement list."""
    size = OUT if dim == 0 else IN
    p = _problem(dim, "span", torch.float32, bias=False)
    index = torch.arange(size)
    p.update(index=index, start=0, stop=size)
    p["sel"], p["rest"] = K.index_lists(index, size)
    p["weight"] = torch.zeros_like(p["weight"])
    p["block"] = torch.randn((size, IN) if dim == 0 else (OUT, size)).requires_grad_(True)
    _assert_matches(_run(p), _reference(p), torch.float32)


@pytest.mark.parametrize("torch_mode", [False, True])
def test_one_token_and_empty_batch(monkeypatch, torch_mode):
    monkeypatch.setenv("FXSPARSE_KERNELS", "torch" if torch_mode else "triton")
    p = _problem(1, "gathered", torch.float32, bias=True, batch=(1,))
    _assert_matches(_run(p), _reference(p), torch.float32)
    p = _problem(0, "span", torch.float32, bias=True, batch=(0,))
    y, dx, dblock = _run(p)
    assert y.shape == (0, OUT) and dx.shape == (0, IN) and torch.count_nonzero(dblock) == 0


@pytest.mark.parametrize("dim", [0, 1])
def test_other_tiles_and_split_token_reduction(triton_kernels, dim):
    """Launchers with explicit configs: 16-row tiles, K tiles wider than a range, the token reduction in 3 splits."""
    p = _problem(dim, "gathered" if dim else "span", torch.float32, bias=True, seed=3)
    x2, g2 = p["x"].detach().reshape(-1, IN), p["grad_y"].reshape(-1, OUT)
    w, blk, sel, rest, start, stop = p["weight"], p["block"].detach(), p["sel"], p["rest"], p["start"], p["stop"]
    y_ref, dx_ref, dblock_ref = _reference(p)
    config = Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2})
    y = torch.empty(x2.shape[0], OUT)
    K._launch_split("k" if dim else "n", x2, (w, w.stride(0), w.stride(1)), (blk, blk.stride(0), blk.stride(1)),
                    p["bias"], y, sel, rest, IN, sel.numel(), start, stop, config=config)
    torch.testing.assert_close(y.double(), y_ref.reshape(-1, OUT), **TOLERANCES[torch.float32])
    dx = torch.empty(x2.shape[0], IN)
    K._launch_split("n" if dim else "k", g2, (w, w.stride(1), w.stride(0)), (blk, blk.stride(1), blk.stride(0)),
                    None, dx, sel, rest, OUT, sel.numel(), start, stop, config=config)
    torch.testing.assert_close(dx.double(), dx_ref.reshape(-1, IN), **TOLERANCES[torch.float32])
    split = Config({"BLOCK_P": 16, "BLOCK_Q": 64, "BLOCK_M": 16, "SPLIT_M": 3})
    if dim == 1:
        saved = x2.index_select(1, sel)
        dblock = K._launch_grad_block(g2, saved, sel, OUT, 0, start, torch.float32, config=split)
    else:
        dblock = K._launch_grad_block(g2, x2, sel, sel.numel(), 1, start, torch.float32, config=split)
    torch.testing.assert_close(dblock.double(), dblock_ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_gradcheck_float64(monkeypatch, mode):
    monkeypatch.setenv("FXSPARSE_KERNELS", mode)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=gen).index_fill_(1, torch.tensor([1, 4]), 0)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    sel, rest = K.index_lists(torch.tensor([1, 4]), 7)
    x = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    block = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x_, b_, bias_: K.s2ft_linear(x_, weight, bias_, b_, sel, rest, 1)
    assert torch.autograd.gradcheck(fn, (x, block, bias))


def test_opcheck_schemas_fake_and_autograd(monkeypatch):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree."""
    monkeypatch.setenv("FXSPARSE_KERNELS", "torch")
    p = _problem(1, "span", torch.float32, bias=True)
    args = (p["x"], p["weight"], p["bias"], p["block"], p["sel"], p["rest"], 1, p["start"], p["stop"], True)
    torch.library.opcheck(torch.ops.fxsparse.s2ft_linear.default, args)
    q = _problem(0, "gathered", torch.float32, bias=False)
    backward_args = (q["grad_y"], q["x"].detach(), q["weight"], q["block"].detach(), q["sel"], q["rest"], 0, -1, -1,
                     True, True)
    torch.library.opcheck(torch.ops.fxsparse.s2ft_backward.default, backward_args)
    torch.library.opcheck(torch.ops.fxsparse.s2ft_multi_adapter.default, _multi_problem(torch.float32)[0])


# ---------------------------------------------------------------- serving


def _multi_problem(dtype: torch.dtype, seed: int = 5):
    """Three adapters over a 43 x 123 base: column deltas of different widths (gathered), row deltas on one
    adapter, one adapter with neither; tokens in runs (a sequence shares an adapter) and base tokens."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=gen)
    bias = torch.randn(OUT, generator=gen)
    cols = {0: [2, 9, 10, 50, 122], 1: list(range(30, 70))}  # adapter 2 has no columns
    rows = {1: [0, 5, 6, 42], 2: list(range(7, 40))}  # adapter 0 has no rows
    n_adapters, kc, kr = 3, max(map(len, cols.values())), max(map(len, rows.values()))
    col_delta, row_delta = torch.zeros(n_adapters, OUT, kc), torch.zeros(n_adapters, kr, IN)
    col_index, row_index = (torch.zeros(n_adapters, k, dtype=torch.int32) for k in (kc, kr))
    col_count, row_count = (torch.zeros(n_adapters, dtype=torch.int32) for _ in range(2))
    deltas = [[], [], []]
    for a, idx in cols.items():
        d = torch.randn(OUT, len(idx), generator=gen)
        col_delta[a, :, :len(idx)], col_index[a, :len(idx)], col_count[a] = d, torch.tensor(idx), len(idx)
        col_delta[a, :, len(idx):] = 1e3  # padding must be masked, never read into a result
        deltas[a].append((1, torch.tensor(idx), d))
    for a, idx in rows.items():
        d = torch.randn(len(idx), IN, generator=gen)
        row_delta[a, :len(idx)], row_index[a, :len(idx)], row_count[a] = d, torch.tensor(idx), len(idx)
        deltas[a].append((0, torch.tensor(idx), d))
    tokens = torch.tensor([0] * 9 + [-1] * 5 + [2] * 14 + [1] * 11 + [0] * 3 + [1] * 7)
    x = torch.randn(tokens.numel(), IN, generator=gen)
    args = (x.to(dtype), weight.to(dtype), bias.to(dtype), tokens, col_delta.to(dtype), col_index, col_count,
            row_delta.to(dtype), row_index, row_count)
    return args, deltas


def _multi_reference(args, deltas):
    x, weight, bias = (t.double() for t in args[:3])
    deltas64 = [[(dim, idx, d.double()) for dim, idx, d in entry] for entry in deltas]
    return K.multi_adapter_reference(x, weight, bias, args[3], deltas64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_multi_adapter_matches_per_token_merged_weights(monkeypatch, mode, dtype):
    monkeypatch.setenv("FXSPARSE_KERNELS", mode)
    args, deltas = _multi_problem(dtype)
    # the reference applies the deltas as rounded to dtype, like the op sees them
    rounded = [[(dim, idx, d.to(dtype)) for dim, idx, d in entry] for entry in deltas]
    before = K.launch_counts()
    y = K.s2ft_multi_adapter(*args)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _multi_reference(args, rounded), **SERVING_TOLERANCES[dtype])
    launched = {k: v - before.get(k, 0) for k, v in K.launch_counts().items()}
    if mode == "triton":
        assert launched.get("s2ft_multi_adapter_cols") == 1 and launched.get("s2ft_multi_adapter_rows") == 1
    else:
        assert not any(launched.values())


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_multi_adapter_input_gradient(monkeypatch, mode):
    """dx runs the same op with column and row deltas swapped; weight and bias get dense gradients."""
    monkeypatch.setenv("FXSPARSE_KERNELS", mode)
    args, deltas = _multi_problem(torch.float32, seed=6)
    x = args[0].clone().requires_grad_(True)
    weight = args[1].clone().requires_grad_(True)
    bias = args[2].clone().requires_grad_(True)
    grad_y = torch.randn(x.shape[0], OUT)
    dx, dw, db = torch.autograd.grad(K.s2ft_multi_adapter(x, weight, bias, *args[3:]), (x, weight, bias), grad_y)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    ref = _multi_reference((x64, w64, b64, args[3]), deltas)
    dx64, dw64, db64 = torch.autograd.grad(ref, (x64, w64, b64), grad_y.double())
    for got, expected in ((dx, dx64), (dw, dw64), (db, db64)):
        torch.testing.assert_close(got.double(), expected, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------- model level


def _loss_and_grads(model, ids):
    for p in fxsparse.trainable_parameters(model):
        p.grad = None
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in fxsparse.trainable_parameters(model)]


def test_tiny_llama_triton_equals_torch(monkeypatch):
    """A tiny LLaMA S²FT model (rows of v/up, columns of o/down) gives the same loss and block gradients with
    the Triton kernels as with plain torch, and the kernels really ran."""
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.2, "v": 0.5, "up": 0.2})
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("FXSPARSE_KERNELS", "torch")
    loss_torch, grads_torch = _loss_and_grads(model, ids)
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    before = K.launch_counts()
    loss_triton, grads_triton = _loss_and_grads(model, ids)
    launched = {k: v - before.get(k, 0) for k, v in K.launch_counts().items()}
    dims = [m.dim for m in model.modules() if type(m).__name__ == "S2FTLinear"]
    # forward: split_k for columns (dim=1), split_n for rows; dx the other way round, skipped where the input
    # needs no gradient (layer 0's v_proj reads the frozen embeddings)
    assert launched.get("s2ft_split_k", 0) >= dims.count(1) and launched.get("s2ft_split_n", 0) >= dims.count(0)
    assert len(dims) < launched.get("s2ft_split_k", 0) + launched.get("s2ft_split_n", 0) <= 2 * len(dims)
    assert launched.get("s2ft_grad_block") == len(dims)
    assert abs(loss_triton - loss_torch) / loss_torch < 1e-4
    assert grads_torch and len(grads_torch) == len(grads_triton)
    for g_triton, g_torch in zip(grads_triton, grads_torch):
        assert ((g_triton - g_torch).norm() / g_torch.norm()).item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_auto_mode_runs_the_kernels_at_smollm2_shapes(monkeypatch, dim):
    monkeypatch.setenv("FXSPARSE_KERNELS", "auto")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, inp, out, index = 512, 1536, 576, torch.arange(64, 95)
    size = out if dim == 0 else inp
    sel, rest = K.index_lists(index.cuda(), size)
    weight = torch.randn(out, inp, device="cuda", generator=gen).index_fill_(dim, index.cuda(), 0).bfloat16()
    block = torch.randn((31, inp) if dim == 0 else (out, 31), device="cuda", generator=gen).bfloat16()
    x = torch.randn(tokens, inp, device="cuda", generator=gen).bfloat16()
    before = K.launch_counts()
    y = K.s2ft_linear(x, weight, None, block, sel, rest, dim, 64, 95)
    assert sum(K.launch_counts().values()) > sum(before.values())
    ref = K.s2ft_reference(x.double(), weight.double(), None, block.double(), index.cuda(), dim)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.bfloat16])
