"""SLTrainLinear: exact gradients against a dense float64 reference, no dense-sized tensor in training,
parameter counts, supports, merge and resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fxsparse.layers.sltrain import SLTrainLinear, layer_seed

SUPPORT_CASES = [("random", 16), ("block", 8), ("block", 16)]
SHAPES = [(2, 5, 64, 32), (6, 42, 123, 431)]  # (batch, seq, in, out)


def _randomize(layer: SLTrainLinear, seed: int) -> None:
    """B starts at zero (dA would be zero and untested): give every parameter fresh random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _dense_reference(layer: SLTrainLinear):
    """Leaf copies of the parameters and the weight W = B @ A * scale + S built densely from them."""
    A, B, values = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B, layer.values))
    bias = layer.bias.detach().clone().requires_grad_() if layer.bias is not None else None
    rows, cols = layer.support_indices()
    sparse = torch.zeros(layer.out_features, layer.in_features, dtype=A.dtype).index_put(
        (rows, cols), values, accumulate=True
    )
    return A, B, values, bias, (B @ A) * layer.scale + sparse


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_dense_reference(support, block_size, bias, shape):
    batch, seq, d_in, d_out = shape
    layer = SLTrainLinear(d_in, d_out, rank=7, sparsity=0.05, alpha=16.0, support=support, block_size=block_size,
                          bias=bias, seed=3, dtype=torch.float64)
    _randomize(layer, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(batch, seq, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(batch, seq, d_out, generator=gen, dtype=torch.float64)
    y = layer(x)
    (y * probe).sum().backward()

    A, B, values, ref_bias, weight = _dense_reference(layer)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = nn.functional.linear(x_ref, weight, ref_bias)
    (y_ref * probe).sum().backward()

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.A.grad, A.grad)
    torch.testing.assert_close(layer.B.grad, B.grad)
    torch.testing.assert_close(layer.values.grad, values.grad)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref_bias.grad)


def test_pure_low_rank_layer_has_no_sparse_part():
    layer = SLTrainLinear(40, 24, rank=5, sparsity=0.0, alpha=10.0, seed=0, dtype=torch.float64)
    _randomize(layer, seed=4)
    assert layer.nnz == 0
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    (layer(x) ** 2).sum().backward()
    A, B, _, bias, weight = _dense_reference(layer)
    torch.testing.assert_close(weight, (B @ A) * 2.0)
    x_ref = x.detach().clone().requires_grad_()
    (nn.functional.linear(x_ref, weight, bias) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.A.grad, A.grad)
    torch.testing.assert_close(layer.B.grad, B.grad)


class _LargestOutput(TorchDispatchMode):
    """Records the largest op output seen; a sparse tensor counts by what it stores, not its dense shape."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_coo):
                size = t.values().numel() if t.layout != torch.sparse_coo else t._values().numel()
            else:
                size = t.numel()
            if size > self.largest[0]:
                self.largest = (size, str(func))
        return out


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_training_never_materialises_a_dense_weight(support, block_size):
    d_in, d_out, tokens = 123, 431, 12  # activations (12 x 431) stay far below one weight (431 x 123)
    layer = SLTrainLinear(d_in, d_out, rank=6, sparsity=0.05, alpha=16.0, support=support, block_size=block_size)
    _randomize(layer, seed=0)
    x = torch.randn(2, tokens // 2, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with _LargestOutput() as mode:
        (layer(x) * 1.5).sum().backward()
    assert x.grad is not None and layer.values.grad is not None
    assert mode.largest[0] < d_out * d_in, f"{mode.largest[1]} produced {mode.largest[0]} elements"
    # the check itself sees a dense weight when one is built
    with _LargestOutput() as mode:
        layer.dense_weight()
    assert mode.largest[0] >= d_out * d_in


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count(support, block_size, bias):
    d_in, d_out, rank, sparsity = 123, 431, 7, 0.03
    layer = SLTrainLinear(d_in, d_out, rank, sparsity=sparsity, support=support, block_size=block_size, bias=bias)
    if support == "random":
        expected_nnz = round(sparsity * d_in * d_out)
    else:
        expected_nnz = round(sparsity * d_in * d_out / block_size**2) * block_size**2
    assert layer.nnz == expected_nnz
    total = sum(p.numel() for p in layer.parameters())
    assert total == rank * (d_in + d_out) + expected_nnz + (d_out if bias else 0)
    assert [n for n, _ in layer.named_parameters()] == ["A", "B", "values"] + (["bias"] if bias else [])


def test_random_support_is_compact_distinct_and_in_range():
    layer = SLTrainLinear(123, 431, rank=4, sparsity=0.03, seed=7)
    assert layer.support_crow.dtype == torch.int32 and layer.support_col.dtype == torch.int32
    # 4 bytes per non-zero plus 4 bytes per output row
    assert layer.support_col.element_size() * layer.support_col.numel() == 4 * layer.nnz
    assert layer.support_crow.numel() == 431 + 1
    rows, cols = layer.support_indices()
    flat = rows * 123 + cols
    assert flat.unique().numel() == layer.nnz
    assert int(cols.min()) >= 0 and int(cols.max()) < 123 and int(rows.max()) < 431
    # entries are spread over the whole matrix, not packed in a corner
    assert rows.float().mean().item() == pytest.approx(215, abs=40)
    assert cols.float().mean().item() == pytest.approx(61, abs=12)
    state = layer.state_dict()
    assert {"support_crow", "support_col"} <= set(state) and not any(k.startswith("_") for k in state)


def test_block_support_tiles_are_distinct_full_and_cover_the_grid():
    layer = SLTrainLinear(123, 431, rank=4, sparsity=0.1, support="block", block_size=8, seed=7)
    assert layer.tile_row.dtype == torch.int32 and layer.tile_col.dtype == torch.int32
    tiles = layer.tile_row.long() * (123 // 8) + layer.tile_col.long()
    assert tiles.unique().numel() == tiles.numel() == round(0.1 * 123 * 431 / 64)
    assert int(layer.tile_row.max()) < 431 // 8 and int(layer.tile_col.max()) < 123 // 8
    rows, cols = layer.support_indices()
    # values are stored tile by tile, row-major inside the tile
    assert rows[:8].tolist() == [int(layer.tile_row[0]) * 8] * 8
    assert cols[:8].tolist() == list(range(int(layer.tile_col[0]) * 8, int(layer.tile_col[0]) * 8 + 8))


@pytest.mark.parametrize("support", ["random", "block"])
def test_support_and_init_deterministic_in_seed(support):
    make = lambda seed: SLTrainLinear(64, 96, rank=8, sparsity=0.05, support=support, block_size=8, seed=seed)
    a, b, c = make(1), make(1), make(2)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    names = ["support_col"] if support == "random" else ["tile_row", "tile_col"]
    assert any(not torch.equal(getattr(a, n), getattr(c, n)) for n in names)
    assert layer_seed(0, "a.b") != layer_seed(0, "a.c") and layer_seed(0, "a.b") != layer_seed(1, "a.b")


def test_initialisation_follows_the_paper():
    layer = SLTrainLinear(200, 150, rank=16, sparsity=0.05, seed=3)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.bias) == 0
    kaiming_bound = 1.0 / math.sqrt(200)  # kaiming_uniform_(a=sqrt(5)) on fan_in=200
    a_max = float(layer.A.detach().abs().max())
    assert 0.9 * kaiming_bound < a_max <= kaiming_bound
    assert float(layer.values.detach().abs().max()) <= 1.0 / math.sqrt(200)
    assert float(layer.values.detach().std()) == pytest.approx(1.0 / math.sqrt(200) / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear_is_exact(support, block_size, bias):
    layer = SLTrainLinear(123, 431, rank=7, sparsity=0.05, support=support, block_size=block_size, bias=bias,
                          seed=2, dtype=torch.float64)
    _randomize(layer, seed=9)
    x = torch.randn(3, 5, 123, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and (linear.bias is not None) == bias
    torch.testing.assert_close(linear(x), layer(x))
    *_, weight = _dense_reference(layer)
    torch.testing.assert_close(linear.weight, weight.detach())


def test_conv1d_round_trip():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(96, 40).double()  # nf=out=96, nx=in=40, weight (40, 96)
    layer = SLTrainLinear.from_linear(conv, rank=6, sparsity=0.05, alpha=8.0, seed=1)
    assert (layer.in_features, layer.out_features, layer.conv1d) == (40, 96, True)
    assert layer.A.dtype == torch.float64 and layer.bias.shape == (96,) and torch.count_nonzero(layer.bias) == 0
    _randomize(layer, seed=2)
    x = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    merged = layer.to_linear()
    assert type(merged) is Conv1D and merged.weight.shape == (40, 96)
    torch.testing.assert_close(merged(x), layer(x))


def test_from_linear_keeps_bias_shape_dtype_and_zeroes_bias():
    linear = nn.Linear(30, 20, bias=True).double()
    layer = SLTrainLinear.from_linear(linear, rank=4, sparsity=0.1, alpha=8.0)
    assert layer.bias.shape == (20,) and layer.bias.dtype == torch.float64 and torch.count_nonzero(layer.bias) == 0
    assert SLTrainLinear.from_linear(nn.Linear(30, 20, bias=False), rank=4).bias is None
    with pytest.raises(ValueError, match="Embedding"):
        SLTrainLinear.from_linear(nn.Embedding(30, 20), rank=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -3}, "rank=-3"),
        ({"rank": 24}, "rank=24"),
        ({"rank": 30}, "rank=30"),
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"support": "diagonal"}, "'diagonal'"),
        ({"support": "block", "block_size": 32}, "block_size=32"),
        ({"support": "block", "block_size": 0}, "block_size=0"),
        ({"alpha": 0.0}, "alpha=0.0"),
    ],
)
def test_bad_values_raise_value_error_naming_them(kwargs, match):
    args = {"rank": 4, "sparsity": 0.03, "alpha": 8.0, "support": "random", "block_size": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        SLTrainLinear(30, 24, **args)


def _train(layer: SLTrainLinear, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, layer.in_features, generator=gen, dtype=layer.A.dtype)
        target = torch.randn(4, layer.out_features, generator=gen, dtype=layer.A.dtype)
        opt.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_resume_is_exact(support, block_size):
    make = lambda: SLTrainLinear(48, 80, rank=6, sparsity=0.05, support=support, block_size=block_size, seed=4)
    trained = make()
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    _train(trained, opt, steps=3, seed=0)

    resumed = make()
    resumed.load_state_dict(trained.state_dict())
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # else both optimizers share moment tensors
    _train(trained, opt, steps=2, seed=1)
    _train(resumed, opt2, steps=2, seed=1)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("support", ["random", "block"])
def test_loading_another_support_rebuilds_the_kernel_indices(support):
    src = SLTrainLinear(48, 80, rank=6, sparsity=0.05, support=support, block_size=8, seed=4)
    _randomize(src, seed=0)
    dst = SLTrainLinear(48, 80, rank=6, sparsity=0.05, support=support, block_size=8, seed=5)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    torch.testing.assert_close(dst.dense_weight(), src.dense_weight(), rtol=0, atol=0)
    assert dst.seed == 4  # the seed comes with the support it drew: reset_support() draws the loaded one again


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
@pytest.mark.parametrize("mode", ["bf16-params", "autocast"])
def test_bfloat16_matches_float64_reference(support, block_size, mode):
    # MKL has no bf16 CSR kernels: the random support's sparse products fall back to float32 on CPU
    layer = SLTrainLinear(40, 48, rank=4, sparsity=0.1, alpha=8.0, support=support, block_size=block_size, seed=1)
    _randomize(layer, seed=3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.bfloat16())  # bf16-representable, so the reference sees the same numbers
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4)).bfloat16()
    *_, weight = _dense_reference(layer.double())
    y_ref = nn.functional.linear(x.double(), weight.detach(), layer.bias.detach())
    if mode == "bf16-params":
        y = layer.bfloat16()(x)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer.float()(x.float())
        y.float().sum().backward()
        assert layer.values.grad.dtype == torch.float32 and layer.A.grad is not None
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits and the layer rounds a few times (x @ A.T, the sum, the output):
    # bound the error by 4 units in the last place of the largest output
    error = (y.double() - y_ref).abs().max().item()
    assert error <= 4 * 2.0**-8 * y_ref.abs().max().item()
    assert error > 0  # the comparison is not vacuous: bf16 did round


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_input_without_grad_still_gives_parameter_gradients(support, block_size):
    layer = SLTrainLinear(50, 70, rank=5, sparsity=0.08, support=support, block_size=block_size, seed=6,
                          dtype=torch.float64)
    _randomize(layer, seed=7)
    x = torch.randn(9, 50, generator=torch.Generator().manual_seed(8), dtype=torch.float64)  # no grad: dx skipped
    (layer(x) ** 2).sum().backward()
    A, B, values, bias, weight = _dense_reference(layer)
    (nn.functional.linear(x, weight, bias) ** 2).sum().backward()
    for got, want in [(layer.A.grad, A.grad), (layer.B.grad, B.grad), (layer.values.grad, values.grad),
                      (layer.bias.grad, bias.grad)]:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_layer_pickles_and_keeps_rebuilding_after_load(support, block_size, tmp_path):
    import io

    layer = SLTrainLinear(48, 80, rank=6, sparsity=0.05, support=support, block_size=block_size, seed=4)
    _randomize(layer, seed=1)
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # a lambda hook made this fail
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    other = SLTrainLinear(48, 80, rank=6, sparsity=0.05, support=support, block_size=block_size, seed=9)
    loaded.load_state_dict(other.state_dict())  # the load hook survived pickling: kernel indices rebuilt
    torch.testing.assert_close(loaded(x), other(x), rtol=0, atol=0)
    copied = copy.deepcopy(loaded)
    torch.testing.assert_close(copied(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize("support,block_size", [("random", 16), ("block", 8)])
def test_support_bytes_are_what_the_docstring_says(support, block_size):
    d_in, d_out = 123, 431
    layer = SLTrainLinear(d_in, d_out, rank=4, sparsity=0.05, support=support, block_size=block_size)
    # settings: 5 int64 per layer (seed, rank, alpha, support, block size), not per non-zero
    assert layer.settings.dtype == torch.int64 and layer.settings.numel() == 5
    held = {k: v for k, v in layer.named_buffers() if k != "settings"}
    persistent = {k: v for k, v in layer.state_dict().items() if k in held}
    size = lambda buffers: sum(b.numel() * b.element_size() for b in buffers.values())  # noqa: E731
    assert all(b.dtype == torch.int32 for b in held.values())
    if support == "random":
        assert size(persistent) == 4 * layer.nnz + 4 * (d_out + 1)
        assert size(held) == 12 * layer.nnz + 4 * (d_out + 1) + 4 * (d_in + 1)
    else:
        tiles = layer.nnz // block_size**2
        assert size(persistent) == 8 * tiles
        n_rows, n_cols = -(-d_out // block_size), -(-d_in // block_size)
        assert size(held) == 12 * tiles + 4 * (n_rows + 1) + 4 * (n_cols + 1)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_forward_and_backward_are_the_fxsparse_ops(support, block_size):
    layer = SLTrainLinear(40, 48, rank=4, sparsity=0.1, support=support, block_size=block_size, seed=1)
    x = torch.randn(6, 40, requires_grad=True)
    with _OpNames() as mode:
        y = layer(x)
    assert f"fxsparse.sltrain_{support}_fwd.default" in mode.names
    with _OpNames() as mode:
        y.sum().backward()
    assert f"fxsparse.sltrain_{support}_bwd.default" in mode.names


@pytest.mark.parametrize("support,block_size", SUPPORT_CASES)
def test_saves_only_x_and_the_rank_r_activation(support, block_size):
    from fxsparse.memory import SavedActivations

    tokens, d_in, d_out, rank = 24, 64, 96, 5
    layer = SLTrainLinear(d_in, d_out, rank=rank, sparsity=0.1, support=support, block_size=block_size, seed=1)
    x = torch.randn(tokens, d_in, requires_grad=True)
    with SavedActivations(exclude=[*layer.parameters(), *layer.buffers()]) as saved:
        y = layer(x)
    assert sorted(saved.storages.values()) == sorted([4 * tokens * rank, 4 * tokens * d_in])
    y.sum().backward()
