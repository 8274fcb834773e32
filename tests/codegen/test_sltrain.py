"""SLTrain ops and kernels: forward and every gradient against autograd of a dense float64 reference, on both
implementations (``FXSPARSE_KERNELS=torch`` and ``triton``, the latter in the interpreter on CPU), a tiny
LLaMA trained through each, and ``torch.compile(fullgraph=True)`` with no graph break."""

import pytest
import torch

import fxsparse
from fxsparse.codegen import sltrain as K
from fxsparse.layers.sltrain import SLTrainLinear, block_support, random_support
from fxsparse.models import tiny_model

# (tokens, in, out, rank): powers of two and awkward sizes (no dimension a multiple of any tile)
SHAPES = [(6, 42, 123, 5), (16, 64, 32, 8), (37, 24, 20, 3)]
# (block_size, shape): narrow tiles share a program's 16 columns (4, 6, 8); 6 and 24 are no powers of two
BLOCK_CASES = [(4, (6, 42, 123, 5)), (8, (16, 64, 32, 8)), (16, (37, 48, 40, 3)), (16, (6, 42, 123, 5)),
               (6, (6, 42, 123, 5)), (24, (10, 50, 75, 5))]
MODES = ["torch", "triton"]


class Tol:
    """Per-dtype tolerance: ``atol`` is relative to the largest reference magnitude (outputs of different
    scales round at different absolute levels); bf16 keeps 8 bits, so a few of its units in the last place."""

    table = {torch.float32: (1e-5, 2e-6), torch.bfloat16: (2.0**-6, 2.0**-6), torch.float64: (1e-10, 1e-12)}

    @classmethod
    def check(cls, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
        rtol, atol = cls.table[dtype]
        scale = ref.abs().max().item() if ref.numel() else 1.0
        torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{what}: {m}")


@pytest.fixture
def kernels(monkeypatch):
    def use(mode: str) -> None:
        monkeypatch.setenv("FXSPARSE_KERNELS", mode)

    return use


def _leaves(gen: torch.Generator, dtype: torch.dtype, *shapes, device="cpu") -> list[torch.Tensor]:
    """Seeded random leaves, representable in ``dtype`` (the float64 reference sees the same numbers)."""
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]


def _random_case(shape, gen, density=0.1, crow=None, col=None):
    tokens, d_in, d_out, rank = shape
    if crow is None:
        crow, col = random_support(d_out, d_in, round(density * d_in * d_out), gen)
    rows = torch.repeat_interleave(torch.arange(d_out), crow.long().diff())
    return (crow, col, *K.transpose_csr(crow, col, d_in)), rows, col.long()


def _block_case(shape, gen, block_size, density=0.2):
    tokens, d_in, d_out, rank = shape
    tiles = max(1, round(density * (d_out // block_size) * (d_in // block_size)))
    tile_row, tile_col = block_support(d_out, d_in, tiles, block_size, gen)
    support = (tile_row, tile_col, *K.tile_pointers(tile_row, tile_col, d_out, d_in, block_size))
    offs = torch.arange(block_size)
    rows = (tile_row.long()[:, None, None] * block_size + offs[None, :, None]).expand(-1, -1, block_size)
    cols = (tile_col.long()[:, None, None] * block_size + offs[None, None, :]).expand(-1, block_size, -1)
    return support, rows.reshape(-1), cols.reshape(-1), tiles * block_size**2


def _check_against_dense(call, shape, nnz, rows, cols, dtype, bias=True, x_grad=True, batch=None, seed=0,
                         device="cpu"):
    """Run ``call`` (the op under test) and the dense float64 reference on the same leaves, compare y and
    every gradient, and return the leaves (x, A, B, values, bias)."""
    tokens, d_in, d_out, rank = shape
    gen = torch.Generator().manual_seed(seed)
    x_shape = (tokens, d_in) if batch is None else (batch, tokens, d_in)
    x, A, B, values, b = _leaves(gen, dtype, x_shape, (rank, d_in), (d_out, rank), (nnz,), (d_out,), device=device)
    b = b if bias else None
    x.requires_grad_(x_grad)
    scale = 0.7
    y = call(x, A, B, values, b, scale)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], d_out)
    probe = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    (y * probe).sum().backward()

    ref = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, A, B, values, b)]
    y_ref = K.sltrain_reference(ref[0], ref[1], ref[2], ref[3], ref[4], rows, cols, scale)
    (y_ref * probe.double()).sum().backward()
    Tol.check(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dA", "dB", "dvalues", "dbias"), (x, A, B, values, b), ref):
        if want is None or not want.requires_grad:
            assert got is None or got.grad is None, name
            continue
        assert got.grad is not None and got.grad.dtype == dtype, name
        Tol.check(got.grad, want.grad, dtype, name)
    return x, A, B, values, b


def _launched(before: dict) -> dict:
    after = K.launch_counts()
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# ---------------------------------------------------------------- random support (CSR)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_support_matches_dense_reference(kernels, mode, dtype, shape):
    kernels(mode)
    gen = torch.Generator().manual_seed(1)
    support, rows, cols = _random_case(shape, gen)
    before = K.launch_counts()
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *support, s),
                         shape, rows.numel(), rows, cols, dtype)
    expected = {"sltrain_lowrank_csr": 2, "sltrain_csr_sddmm": 1} if mode == "triton" else {}
    assert _launched(before) == expected  # forward + dx fused launches, one SDDMM; none on the torch path


@pytest.mark.parametrize("mode", MODES)
def test_random_support_uneven_rows(kernels, mode):
    """Empty rows, one dense row and one dense column: the CSR loops run to each tile's longest row."""
    kernels(mode)
    shape = (9, 40, 70, 4)
    dense = torch.zeros(70, 40, dtype=torch.bool)
    dense[3] = True  # a full row (40 entries) next to empty ones
    dense[:, 7] = True  # a full column: one long row of S.T
    dense[50:60, 20:23] = True
    crow = torch.zeros(71, dtype=torch.int32)
    crow[1:] = dense.sum(1).cumsum(0)
    col = dense.nonzero()[:, 1].to(torch.int32)
    support, rows, cols = _random_case(shape, None, crow=crow, col=col)
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *support, s),
                         shape, rows.numel(), rows, cols, torch.float32, batch=2)


@pytest.mark.parametrize("mode", MODES)
def test_random_support_without_input_grad_skips_dx(kernels, mode):
    kernels(mode)
    shape = (6, 42, 123, 5)
    support, rows, cols = _random_case(shape, torch.Generator().manual_seed(2))
    before = K.launch_counts()
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *support, s),
                         shape, rows.numel(), rows, cols, torch.float32, bias=False, x_grad=False)
    expected = {"sltrain_lowrank_csr": 1, "sltrain_csr_sddmm": 1} if mode == "triton" else {}
    assert _launched(before) == expected


@pytest.mark.parametrize("mode", MODES)
def test_empty_support_is_pure_low_rank(kernels, mode):
    kernels(mode)
    shape = (6, 42, 123, 5)
    crow, col = torch.zeros(124, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    support, rows, cols = _random_case(shape, None, crow=crow, col=col)
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *support, s),
                         shape, 0, rows, cols, torch.float32)
    empty = (torch.zeros(0, dtype=torch.int32),) * 2
    tile_support = (*empty, *K.tile_pointers(*empty, 123, 42, 8))
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_block(x, A, B, v, b, *tile_support, 8, s),
                         shape, 0, rows, cols, torch.float32)


@pytest.mark.parametrize("support,block_size", [("random", 0), ("block", 16), ("block", 8)])
def test_torch_path_over_several_token_chunks(kernels, support, block_size):
    """The CPU composition works on 128-token chunks (random) and per-tile GEMMs or batched tiles (block):
    300 tokens make two full chunks and a tail."""
    kernels("torch")
    shape = (300, 40, 50, 4)
    if support == "random":
        sup, rows, cols = _random_case(shape, torch.Generator().manual_seed(14))
        call = lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *sup, s)  # noqa: E731
        nnz = rows.numel()
    else:
        sup, rows, cols, nnz = _block_case(shape, torch.Generator().manual_seed(14), block_size)
        call = lambda x, A, B, v, b, s: K.sltrain_block(x, A, B, v, b, *sup, block_size, s)  # noqa: E731
    assert shape[0] > 2 * K._CPU_TOKEN_CHUNK
    _check_against_dense(call, shape, nnz, rows, cols, torch.float32)


def test_random_support_gradcheck_float64(kernels):
    kernels("torch")
    shape = (5, 9, 7, 2)
    support, _, _ = _random_case(shape, torch.Generator().manual_seed(3), density=0.3)
    gen = torch.Generator().manual_seed(4)
    leaves = _leaves(gen, torch.float64, (5, 9), (2, 9), (7, 2), (support[1].numel(),), (7,))
    assert torch.autograd.gradcheck(lambda x, A, B, v, b: K.sltrain_random(x, A, B, v, b, *support, 0.7), leaves)


# ---------------------------------------------------------------- block support (tiles)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,shape", BLOCK_CASES)
def test_block_support_matches_dense_reference(kernels, mode, dtype, block_size, shape):
    kernels(mode)
    support, rows, cols, nnz = _block_case(shape, torch.Generator().manual_seed(5), block_size)
    before = K.launch_counts()
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_block(x, A, B, v, b, *support, block_size, s),
                         shape, nnz, rows, cols, dtype)
    expected = {"sltrain_lowrank_tiles": 2, "sltrain_tiles_sddmm": 1} if mode == "triton" else {}
    assert _launched(before) == expected


@pytest.mark.parametrize("mode", MODES)
def test_block_support_crowded_rows_and_3d_input(kernels, mode):
    """Several tiles in one block-row and one block-column (the tile loops), a batch dimension, no bias."""
    kernels(mode)
    shape, bs = (7, 40, 36, 4), 4
    tile_row = torch.tensor([0, 0, 0, 2, 5, 5, 8], dtype=torch.int32)
    tile_col = torch.tensor([0, 3, 9, 3, 1, 3, 3], dtype=torch.int32)
    support = (tile_row, tile_col, *K.tile_pointers(tile_row, tile_col, 36, 40, bs))
    offs = torch.arange(bs)
    rows = (tile_row.long()[:, None, None] * bs + offs[None, :, None]).expand(-1, -1, bs).reshape(-1)
    cols = (tile_col.long()[:, None, None] * bs + offs[None, None, :]).expand(-1, bs, -1).reshape(-1)
    _check_against_dense(lambda x, A, B, v, b, s: K.sltrain_block(x, A, B, v, b, *support, bs, s),
                         shape, rows.numel(), rows, cols, torch.float32, bias=False, batch=3)


def test_block_support_gradcheck_float64(kernels):
    kernels("torch")
    shape, bs = (5, 8, 12, 2), 4
    support, _, _, nnz = _block_case(shape, torch.Generator().manual_seed(6), bs, density=0.5)
    leaves = _leaves(torch.Generator().manual_seed(7), torch.float64, (5, 8), (2, 8), (12, 2), (nnz,), (12,))
    assert torch.autograd.gradcheck(lambda x, A, B, v, b: K.sltrain_block(x, A, B, v, b, *support, bs, 0.7), leaves)


# ---------------------------------------------------------------- layouts and registration


def test_transpose_csr_lists_every_entry_once_by_column():
    crow, col = random_support(30, 17, 90, torch.Generator().manual_seed(8))
    t_crow, t_row, t_perm = K.transpose_csr(crow, col, 17)
    assert all(t.dtype == torch.int32 for t in (t_crow, t_row, t_perm))
    rows = torch.repeat_interleave(torch.arange(30), crow.long().diff())
    assert sorted(t_perm.tolist()) == list(range(90))
    torch.testing.assert_close(rows[t_perm.long()], t_row.long())
    t_cols = torch.repeat_interleave(torch.arange(17), t_crow.long().diff())
    torch.testing.assert_close(col.long()[t_perm.long()], t_cols)


def test_tile_pointers_and_unsorted_tiles():
    tile_row, tile_col = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 0, 2, 2])
    ptr, t_ptr, t_perm = K.tile_pointers(tile_row, tile_col, 17, 13, 4)  # 5 block-rows (one partial), 4 cols
    assert ptr.tolist() == [0, 1, 3, 3, 4, 4] and t_ptr.tolist() == [0, 1, 1, 4, 4]
    assert t_perm.tolist() == [1, 0, 2, 3]
    with pytest.raises(ValueError, match="sorted by block-row"):
        K.tile_pointers(tile_row.flip(0), tile_col, 17, 13, 4)


@pytest.mark.parametrize("support", ["random", "block"])
def test_opcheck(support):
    gen = torch.Generator().manual_seed(9)
    if support == "random":
        crow, col = random_support(8, 16, 20, gen)
        op, args, nnz = torch.ops.fxsparse.sltrain_random_fwd, (crow, col, *K.transpose_csr(crow, col, 16), 0.5), 20
    else:
        tr, tc = block_support(8, 16, 3, 4, gen)
        op, args, nnz = torch.ops.fxsparse.sltrain_block_fwd, (tr, tc, *K.tile_pointers(tr, tc, 8, 16, 4), 4, 0.5), 48
    leaves = _leaves(gen, torch.float32, (5, 16), (3, 16), (8, 3), (nnz,), (8,))
    torch.library.opcheck(op, (*leaves, *args))
    # the backward op, with every gradient asked for and with some left out (empty outputs)
    x, A, B, values, _ = (t.detach() for t in leaves)
    dy, hs = torch.randn(5, 8, generator=gen), torch.randn(5, 3, generator=gen)
    backward = torch.ops.fxsparse.sltrain_random_bwd if support == "random" else torch.ops.fxsparse.sltrain_block_bwd
    for needs in [(True, True, True, True, True), (False, True, False, True, False)]:
        torch.library.opcheck(backward, (dy, x, hs, A, B, values, *args, *needs))


# ---------------------------------------------------------------- a tiny LLaMA, both implementations, compiled


def _sltrain_model(support: str) -> torch.nn.Module:
    model = fxsparse.transform(tiny_model("llama"), "sltrain", rank=4, support=support, block_size=4, sparsity=0.1)
    gen = torch.Generator().manual_seed(10)
    with torch.no_grad():  # B starts at zero (dA would be zero and untested): fresh values everywhere
        for module in model.modules():
            if isinstance(module, SLTrainLinear):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _loss_and_grads(model, tokens, run=None):
    for p in model.parameters():
        p.grad = None
    loss = (run if run is not None else model)(tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(got, want, rel=1e-4):
    loss, grads = got
    assert abs(loss.item() - want[0].item()) <= rel * abs(want[0].item())
    assert grads.keys() == want[1].keys()
    for name, g in grads.items():
        ref = want[1][name]
        error = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        assert error < rel, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("support", ["random", "block"])
def test_tiny_llama_triton_matches_torch(kernels, support):
    model = _sltrain_model(support)
    layers = sum(isinstance(m, SLTrainLinear) for m in model.modules())
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(11))
    kernels("torch")
    before = K.launch_counts()
    want = _loss_and_grads(model, tokens)
    assert _launched(before) == {}
    kernels("triton")
    got = _loss_and_grads(model, tokens)
    _assert_same_step(got, want)
    family = "csr" if support == "random" else "tiles"
    # every layer: one fused forward, one fused dx (the embeddings train, so every input needs grad), one SDDMM
    assert _launched(before) == {f"sltrain_lowrank_{family}": 2 * layers, f"sltrain_{family}_sddmm": layers}


@pytest.mark.parametrize("support,backend", [("random", "inductor"), ("block", "inductor"), ("block", "fxsparse")])
def test_compiled_model_has_no_graph_break_and_matches_eager(kernels, support, backend):
    model = _sltrain_model(support)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(12))
    kernels("torch")
    explained = torch._dynamo.explain(model)(tokens, labels=tokens)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    want = _loss_and_grads(model, tokens)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _assert_same_step(_loss_and_grads(model, tokens, compiled), want)
    # the ops read FXSPARSE_KERNELS at run time: the same compiled graph runs the Triton kernels
    kernels("triton")
    before = K.launch_counts()
    _assert_same_step(_loss_and_grads(model, tokens, compiled), want)
    assert _launched(before)
    torch._dynamo.reset()


# ---------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("support", ["random", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_dense_reference(kernels, support, dtype):
    kernels("auto")
    shape = (300, 256, 384, 32)
    if support == "random":
        support_t, rows, cols = _random_case(shape, torch.Generator().manual_seed(13), density=0.03)
        support_t = tuple(t.cuda() for t in support_t)
        nnz = rows.numel()
        call = lambda x, A, B, v, b, s: K.sltrain_random(x, A, B, v, b, *support_t, s)  # noqa: E731
    else:
        support_t, rows, cols, nnz = _block_case(shape, torch.Generator().manual_seed(13), 32, density=0.05)
        support_t = tuple(t.cuda() for t in support_t)
        call = lambda x, A, B, v, b, s: K.sltrain_block(x, A, B, v, b, *support_t, 32, s)  # noqa: E731
    before = K.launch_counts()
    _check_against_dense(call, shape, nnz, rows.cuda(), cols.cuda(), dtype, device="cuda")
    assert _launched(before)
