"""Kernel selection (``FXSPARSE_KERNELS``), launch configs, ``pick_config``'s tuning and records, and the
``fxsparse tune`` command (table, ``--clear``, machines with nothing to tune)."""

import importlib.util
import json

import pytest
import torch
from torch import nn

from fxsparse.app.cli import main
from fxsparse.codegen import autotune, cache
from fxsparse.codegen.autotune import Config, kernels_mode, pick_config, record_picks, tuned_records, use_triton
from fxsparse.tune import format_table, tune_model

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    total = tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


CONFIGS = [Config({"BLOCK": 32}), Config({"BLOCK": 64}), Config({"BLOCK": 128})]
# tests/conftest.py turns the interpreter on where there is no GPU; on a GPU machine the toy kernel runs on CUDA
INTERPRET = autotune.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no GPU, no interpreter")


def toy_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()

    def run(config: Config) -> None:
        _add_kernel[(triton.cdiv(n, config.kwargs["BLOCK"]),)](x, y, out, n, **config.launch_kwargs())

    run(pick_config("toy_add", _add_kernel, {"M": triton.next_power_of_2(n), "dtype": x.dtype}, CONFIGS, run))
    return out


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "fxcache"
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(folder))
    monkeypatch.delenv("FXSPARSE_KERNELS", raising=False)
    autotune.forget_picked()
    cache.reset_cache_stats()
    yield folder
    autotune.forget_picked()
    cache.reset_cache_stats()


# ---------------------------------------------------------------- FXSPARSE_KERNELS


@pytest.mark.parametrize(
    "mode, interpret, expected",
    [
        (None, "1", False),  # auto: Triton on CUDA tensors only
        ("auto", "1", False),
        ("", "0", False),  # empty means auto
        ("torch", "1", False),
        (" Torch ", "0", False),
        ("triton", "1", True),  # CPU tensors run in the interpreter
        ("TRITON", "1", True),
    ],
)
def test_use_triton_on_cpu_tensors(monkeypatch, mode, interpret, expected):
    if mode is None:
        monkeypatch.delenv("FXSPARSE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("FXSPARSE_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert use_triton(torch.ones(2), torch.ones(3)) is expected


def test_triton_mode_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        use_triton(torch.ones(2))


def test_bad_kernels_mode_is_a_value_error_naming_it(monkeypatch):
    monkeypatch.setenv("FXSPARSE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="'cuda-please'"):
        use_triton(torch.ones(2))
    with pytest.raises(ValueError, match="'cuda-please'"):
        kernels_mode()


def test_triton_mode_without_triton_installed(monkeypatch):
    monkeypatch.setattr(autotune, "triton_available", lambda: False)
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    with pytest.raises(ValueError, match="not installed"):
        use_triton(torch.ones(2))
    monkeypatch.setenv("FXSPARSE_KERNELS", "auto")
    assert use_triton(torch.ones(2)) is False


def test_kernels_mode_is_read_at_every_call(monkeypatch):
    monkeypatch.setenv("FXSPARSE_KERNELS", "torch")
    assert kernels_mode() == "torch"
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    assert kernels_mode() == "triton"


# ---------------------------------------------------------------- Config


def test_config_round_trip_and_launch_kwargs(monkeypatch):
    config = Config({"BLOCK_M": 64, "EVEN_K": True}, num_warps=8, num_stages=3)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.describe() == "BLOCK_M=64 EVEN_K=True w8 s3"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert config.launch_kwargs() == {"BLOCK_M": 64, "EVEN_K": True}  # the interpreter rejects warps/stages
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert config.launch_kwargs() == {"BLOCK_M": 64, "EVEN_K": True, "num_warps": 8, "num_stages": 3}


@pytest.mark.parametrize(
    "data",
    [
        {"kwargs": {"BLOCK": "64"}, "num_warps": 4, "num_stages": 2},
        {"kwargs": {"BLOCK": [64]}, "num_warps": 4, "num_stages": 2},
        {"kwargs": {}, "num_warps": 0, "num_stages": 2},
        {"kwargs": {}, "num_warps": 4.5, "num_stages": 2},
        {"kwargs": {}, "num_warps": True, "num_stages": 2},
        {"kwargs": {}, "num_warps": 4},
    ],
)
def test_config_from_bad_dict_raises(data):
    with pytest.raises((ValueError, KeyError)):
        Config.from_dict(data)


# ---------------------------------------------------------------- pick_config


def test_no_candidates_is_a_value_error(cache_folder):
    with pytest.raises(ValueError, match="no candidate configs for kernel 'toy_add'"):
        pick_config("toy_add", _add_kernel, {}, [], lambda config: None)


def test_interpreter_takes_the_first_candidate_without_running_it(cache_folder, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run(config):
        raise AssertionError("nothing is timed under the interpreter")

    assert pick_config("toy_add", _add_kernel, {"M": 8}, CONFIGS, run) == CONFIGS[0]
    [record] = tuned_records()
    assert (record.kernel, dict(record.key), record.config, record.best_ms) == ("toy_add", {"M": "8"}, CONFIGS[0], None)
    assert record.source == "tuned" and not record.from_disk
    assert [c for c, _ in record.timings] == CONFIGS


def test_memory_hits_skip_hashing_even_with_unhashable_key_values(cache_folder, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    keys = [{"M": 8, "dtype": torch.float16}, {"M": 8, "rows": [1, 2]}]
    for key in keys:
        assert pick_config("toy_add", _add_kernel, key, CONFIGS, lambda config: None) == CONFIGS[0]

    def no_hashing(*args, **kwargs):
        raise AssertionError("a memory hit must not hash the full key")

    monkeypatch.setattr(cache, "full_key", no_hashing)
    for key in keys:
        assert pick_config("toy_add", _add_kernel, dict(key), CONFIGS, lambda config: None) == CONFIGS[0]
    assert (cache.cache_stats()["hits"], cache.cache_stats()["misses"]) == (2, 2)
    autotune.forget_picked()
    with pytest.raises(AssertionError, match="must not hash"):
        pick_config("toy_add", _add_kernel, keys[0], CONFIGS, lambda config: None)


@needs_kernels
def test_toy_kernel_is_exact_and_records_come_from_disk_in_a_fresh_process(cache_folder):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 42, generator=gen).to(DEVICE), torch.randn(6, 42, generator=gen).to(DEVICE)
    torch.testing.assert_close(toy_add(x, y), (x.double() + y.double()).float(), rtol=0, atol=0)
    if not INTERPRET:
        assert tuned_records()[0].best_ms > 0
    assert [r.source for r in tuned_records()] == ["tuned"]
    autotune.forget_picked()  # what a new process starts with
    toy_add(x, y)
    assert [r.source for r in tuned_records()] == ["disk"]
    assert tuned_records()[0].from_disk and cache.cache_stats()["hits"] == 1


@needs_kernels
def test_record_picks_lists_memory_hits_once(cache_folder):
    def rand(n):
        return torch.randn(n, device=DEVICE)

    toy_add(rand(10), rand(10))
    with record_picks() as picked:
        toy_add(rand(10), rand(10))  # memory hit
        toy_add(rand(12), rand(12))  # same bucket 16
        toy_add(rand(40), rand(40))  # new bucket 64
    assert [dict(r.key)["M"] for r in picked] == ["16", "64"]
    assert len(tuned_records()) == 2  # the history has each specialisation once


def _fake_gpu(monkeypatch, times_ms):
    """Make pick_config take its CUDA path with a fake timer: ``times_ms[BLOCK]`` or an exception."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(autotune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cache, "_device_name", lambda: "Fake GPU")
    monkeypatch.setattr(autotune, "_where", lambda: ("cuda", 0))
    launched = []

    def fake_median(fn, *args, **kwargs):
        fn()
        block = launched[-1].kwargs["BLOCK"]
        if isinstance(times_ms[block], Exception):
            raise times_ms[block]
        return times_ms[block]

    monkeypatch.setattr(autotune, "_median_ms", fake_median)
    return launched


def test_cuda_tuning_keeps_the_fastest_and_skips_failing_configs(cache_folder, monkeypatch):
    launched = _fake_gpu(monkeypatch, {32: 2.0, 64: RuntimeError("out of shared memory"), 128: 0.5})
    best = pick_config("toy_add", _add_kernel, {"M": 1024}, CONFIGS, launched.append)
    assert best == CONFIGS[2] and launched == CONFIGS
    [record] = tuned_records()
    assert record.best_ms == 0.5 and [ms for _, ms in record.timings] == [2.0, None, 0.5]
    [path] = (cache_folder / "kernels").glob("*.json")
    entry = json.loads(path.read_text())
    assert entry["key"]["device"] == "Fake GPU" and entry["best_ms"] == 0.5
    assert [c["ms"] for c in entry["candidates"]] == [2.0, None, 0.5]
    autotune.forget_picked()
    assert pick_config("toy_add", _add_kernel, {"M": 1024}, CONFIGS, launched.append) == CONFIGS[2]
    assert len(launched) == 3 and tuned_records()[0].best_ms == 0.5  # from disk, with its time


def test_cuda_tuning_where_every_config_fails_raises(cache_folder, monkeypatch):
    launched = _fake_gpu(monkeypatch, dict.fromkeys((32, 64, 128), RuntimeError("nope")))
    with pytest.raises(RuntimeError, match="every candidate config of kernel 'toy_add' failed"):
        pick_config("toy_add", _add_kernel, {"M": 1024}, CONFIGS, launched.append)
    assert list(cache_folder.glob("kernels/*.json")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timing_and_launch_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    autotune.forget_picked()
    if autotune.interpreting():
        pytest.skip("interpreter on")
    x, y = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    torch.testing.assert_close(toy_add(x, y), x + y, rtol=0, atol=0)
    [record] = tuned_records()
    assert record.best_ms is not None and record.best_ms > 0
    assert all(ms is not None and ms > 0 for _, ms in record.timings)
    assert record.config in CONFIGS


# ---------------------------------------------------------------- fxsparse tune


class _ToyAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        return toy_add(x, y)

    @staticmethod
    def backward(ctx, grad):
        return grad, toy_add(grad, torch.zeros_like(grad))


class _ToyLM(nn.Module):
    """A 'causal LM' whose forward and backward run the toy kernel: what tune_model sees of a real one."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 11, "max_position_embeddings": 8})()
        self.embed = nn.Embedding(11, 3)
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, input_ids, labels):
        hidden = _ToyAdd.apply(self.embed(input_ids), self.bias.expand(*input_ids.shape, 3).contiguous())
        return type("Output", (), {"loss": hidden.square().mean()})()


@needs_kernels
def test_tune_model_runs_forward_and_backward_and_tables_the_picks(cache_folder):
    model = _ToyLM().to(DEVICE)
    records = tune_model(model, tokens=(16, 40), dtypes=("fp32",))
    assert sorted(dict(r.key)["M"] for r in records) == ["128", "64"]  # 16*3=48 -> 64, 40*3=120 -> 128
    assert model.embed.weight.grad is None  # cleared after each step
    table = format_table(records).splitlines()
    assert table[0].split() == ["kernel", "shape", "config", "ms", "source"]
    assert all("toy_add" in line and line.endswith("tuned") for line in table[2:])
    if INTERPRET:
        assert all("n/a (interpreter)" in line for line in table[2:])
    else:
        assert all(f"{r.best_ms:.3f}" in line for line, r in zip(table[2:], records))
    again = tune_model(model, tokens=(16,), dtypes=("fp32",))
    assert len(again) == 1 and cache.cache_stats()["misses"] == 2  # already picked: nothing tuned again


def test_tune_model_rejects_a_seq_len_that_does_not_divide_tokens(cache_folder):
    with pytest.raises(ValueError, match="--seq-len 5 must be positive and divide --tokens 16"):
        tune_model(_ToyLM(), tokens=(16,), seq_len=5)


@needs_kernels
def test_tune_clear_reports_removed_entries_and_folder(cache_folder, capsys):
    toy_add(torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE))
    toy_add(torch.randn(100, device=DEVICE), torch.randn(100, device=DEVICE))
    assert main(["tune", "--clear"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 2 kernel-cache entries from {cache_folder / 'kernels'}"
    assert list((cache_folder / "kernels").glob("*.json")) == []


def test_tune_without_cuda_or_interpreter_says_nothing_is_tuned(cache_folder, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["tune", "--model", "tiny-llama", "--recipe", "sltrain"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and "plain torch" in out and "nothing is tuned" in out


def test_tune_with_torch_kernels_says_nothing_is_tuned(cache_folder, monkeypatch, capsys):
    monkeypatch.setenv("FXSPARSE_KERNELS", "torch")
    assert main(["tune", "--model", "tiny-llama"]) == 0
    assert "FXSPARSE_KERNELS=torch" in capsys.readouterr().out


def test_tune_rejects_options_of_the_other_recipe(cache_folder, capsys):
    assert main(["tune", "--model", "tiny-llama", "--recipe", "s2ft", "--support", "block"]) == 2
    assert "--support apply to sltrain/lowrank" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, extra, again", [
    ("sltrain", [], False),
    ("sltrain", ["--support", "block", "--block-size", "8"], False),
    ("s2ft", ["--ratios", "o=0.5,down=0.25"], True),  # the cheapest model to run twice in the interpreter
])
def test_tune_tiny_llama_in_the_interpreter(cache_folder, capsys, recipe, extra, again):
    module = {"sltrain": "fxsparse.codegen.sltrain", "s2ft": "fxsparse.codegen.s2ft"}[recipe]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} (the Triton kernels) is not written yet")
    argv = ["tune", "--model", "tiny-llama", "--recipe", recipe, "--tokens", "16", *extra]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"{recipe}_")]
    assert rows and all(line.endswith("tuned") for line in rows)
    assert ("n/a (interpreter)" in out) is INTERPRET and f"{len(rows)} kernel shapes: {len(rows)} tuned now" in out
    assert len(list((cache_folder / "kernels").glob("*.json"))) == len(rows)
    if again:
        autotune.forget_picked()  # a fresh process: everything comes from disk
        cache.reset_cache_stats()
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"{len(rows)} kernel shapes: 0 tuned now, {len(rows)} from disk" in out
        assert cache.cache_stats()["misses"] == 0
