"""The on-disk kernel cache: hits and misses across calls and processes, damaged and foreign entries, failed
writes, racing writers. A toy ``@triton.jit`` kernel runs in the interpreter; every test has its own folder.

This file is also the worker script the multi-process tests start (``python test_cache.py MODE ...``).
"""

import json
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fxsparse.codegen import autotune, cache  # noqa: E402
from fxsparse.codegen.autotune import Config, pick_config  # noqa: E402
from fxsparse.codegen.cache import CacheWarning  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, (x * factor).to(y_ptr.dtype.element_ty), mask=mask)


CONFIGS = [Config({"BLOCK": 64}), Config({"BLOCK": 128}, num_warps=8)]
KERNEL = "toy_scale"
# tests/conftest.py turns the interpreter on where there is no GPU; on a GPU machine the same tests run on CUDA
INTERPRET = autotune.interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="no GPU and no interpreter")


def scale(x: torch.Tensor, factor: float, name: str = KERNEL, extra_key: dict | None = None) -> torch.Tensor:
    """``x * factor`` through the toy kernel, its config picked by ``pick_config``."""
    y = torch.empty_like(x)
    n = x.numel()

    def run(config: Config) -> None:
        _scale_kernel[(triton.cdiv(n, config.kwargs["BLOCK"]),)](x, y, n, factor, **config.launch_kwargs())

    key = {"n": triton.next_power_of_2(n), "dtype": x.dtype, **(extra_key or {})}
    run(pick_config(name, _scale_kernel, key, CONFIGS, run))
    return y


def _full_key(n: int = 100, dtype: torch.dtype = torch.float32) -> dict:
    return cache.full_key(KERNEL, _scale_kernel, {"n": triton.next_power_of_2(n), "dtype": dtype}, CONFIGS)


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "kernels").glob("*.json") if not p.name.startswith("."))


def _temp_files(folder: Path) -> list[Path]:
    return sorted((folder / "kernels").glob(".tmp-*"))


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    """A fresh cache folder, zeroed counters and no in-process picks."""
    folder = tmp_path / "fxcache"
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(folder))
    autotune.forget_picked()
    cache.reset_cache_stats()
    yield folder
    autotune.forget_picked()
    cache.reset_cache_stats()


def _worker_env(folder: Path) -> dict:
    env = dict(os.environ, FXSPARSE_CACHE_DIR=str(folder))
    if INTERPRET:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _start_worker(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=_worker_env(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- hits, misses, entries


def test_first_call_misses_and_writes_one_entry_then_memory_hits(cache_folder):
    x = torch.randn(100, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(scale(x, 3.0), x * 3.0, rtol=0, atol=0)
    stats = cache.cache_stats()
    assert (stats["hits"], stats["misses"], stats["tuned"]) == (0, 1, 1)
    assert stats["dir"] == str(cache_folder / "kernels")
    [path] = _entries(cache_folder)
    assert path.name.startswith(KERNEL + "-")
    torch.testing.assert_close(scale(x, -2.0), x * -2.0, rtol=0, atol=0)
    stats = cache.cache_stats()
    assert (stats["hits"], stats["misses"], stats["tuned"]) == (1, 1, 1)
    assert _entries(cache_folder) == [path]
    assert _temp_files(cache_folder) == []


def test_entry_holds_key_config_candidate_timings_and_date(cache_folder):
    scale(torch.randn(100, device=DEVICE), 2.0)
    [path] = _entries(cache_folder)
    entry = json.loads(path.read_text())
    assert entry["key"] == _full_key()
    assert entry["key"]["triton"] == triton.__version__ and entry["key"]["torch"] == torch.__version__
    assert [c["config"] for c in entry["candidates"]] == [c.to_dict() for c in CONFIGS]
    if INTERPRET:
        assert entry["key"]["device"] == "interpreter"
        assert entry["config"] == CONFIGS[0].to_dict()  # the interpreter has no timer: first candidate
        assert [c["ms"] for c in entry["candidates"]] == [None, None] and entry["best_ms"] is None
    else:
        assert entry["key"]["device"] == torch.cuda.get_device_name()
        times = [c["ms"] for c in entry["candidates"]]
        assert all(t > 0 for t in times) and entry["best_ms"] == min(times)
        assert entry["config"] == entry["candidates"][times.index(min(times))]["config"]
    assert (datetime.now().astimezone() - datetime.fromisoformat(entry["created"])).total_seconds() < 600


def test_every_part_of_the_key_selects_its_own_entry(cache_folder):
    scale(torch.randn(100, device=DEVICE), 2.0)
    scale(torch.randn(100, device=DEVICE, dtype=torch.float64), 2.0)  # dtype
    scale(torch.randn(300, device=DEVICE), 2.0)  # token bucket 128 -> 512
    scale(torch.randn(100, device=DEVICE), 2.0, extra_key={"layout": "block"})
    scale(torch.randn(100, device=DEVICE), 2.0, name="toy_scale_other")
    assert len(_entries(cache_folder)) == 5
    assert cache.cache_stats()["misses"] == 5
    base = _full_key()
    assert cache.digest(base) != cache.digest(cache.full_key(KERNEL, _scale_kernel, base["key"], CONFIGS[::-1]))
    assert cache.full_key(KERNEL, _scale_kernel, {}, CONFIGS)["source"] != cache.full_key(KERNEL, scale, {})["source"]


def test_source_hash_covers_the_jit_helpers_a_kernel_calls():
    def make_kernel(helper):
        @triton.jit
        def kernel(x_ptr):
            tl.store(x_ptr, helper(tl.load(x_ptr)))

        return kernel

    @triton.jit
    def double(x):
        return x * 2

    @triton.jit
    def triple(x):
        return x * 3

    with_double, with_triple = make_kernel(double), make_kernel(triple)
    assert cache._jit_helpers(with_double) == [double]
    assert cache._source_hash(with_double) != cache._source_hash(with_triple)  # same text, other helper
    assert cache._source_hash(with_double) == cache._source_hash(make_kernel(double))
    assert cache._jit_helpers(_scale_kernel) == []


def test_second_process_with_the_same_folder_reports_zero_misses(cache_folder):
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    scale(x, 3.0)
    assert cache.cache_stats()["misses"] == 1
    stats = _finish(_start_worker(cache_folder, "second"))
    assert (stats["hits"], stats["misses"], stats["tuned"], stats["corrupt"]) == (1, 0, 0, 0)
    assert stats["result_ok"] is True
    assert len(_entries(cache_folder)) == 1


def test_clear_cache_counts_removed_entries_and_forgets_picks(cache_folder):
    assert cache.clear_cache() == 0  # no folder yet
    scale(torch.randn(100, device=DEVICE), 2.0)
    scale(torch.randn(100, device=DEVICE, dtype=torch.float64), 2.0)
    (cache_folder / "kernels" / ".tmp-123-abc.json").write_text("{")  # a stale temp file of a killed writer
    assert cache.clear_cache() == 2
    assert list((cache_folder / "kernels").glob("*.json")) == []
    scale(torch.randn(100, device=DEVICE), 2.0)
    assert cache.cache_stats()["misses"] == 3  # not a memory hit: clearing forgot this process's picks too


# ---------------------------------------------------------------- damaged and foreign entries


def _truncated(entry_bytes: bytes, key: dict) -> bytes:
    return entry_bytes[: len(entry_bytes) // 2]


def _garbage(entry_bytes: bytes, key: dict) -> bytes:
    return bytes(range(256)) + b"\x00\xff\xfe" * 10


def _json_list(entry_bytes: bytes, key: dict) -> bytes:
    return b"[1, 2, 3]"


def _config_not_a_dict(entry_bytes: bytes, key: dict) -> bytes:
    return json.dumps({"key": key, "config": "BLOCK=64"}).encode()


def _config_with_bad_values(entry_bytes: bytes, key: dict) -> bytes:
    return json.dumps({"key": key, "config": {"kwargs": {"BLOCK": "64"}, "num_warps": 4, "num_stages": 2}}).encode()


def _config_not_a_candidate(entry_bytes: bytes, key: dict) -> bytes:
    return json.dumps({"key": key, "config": Config({"BLOCK": 32}).to_dict()}).encode()


def _other_triton_version(entry_bytes: bytes, key: dict) -> bytes:
    entry = json.loads(entry_bytes)
    entry["key"]["triton"] = "2.0.0"
    return json.dumps(entry).encode()


def _other_source(entry_bytes: bytes, key: dict) -> bytes:
    entry = json.loads(entry_bytes)
    entry["key"]["source"] = "0" * 16
    return json.dumps(entry).encode()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncated, "corrupt entry"),
        (_garbage, "corrupt entry"),
        (_json_list, "not a cache entry"),
        (_config_not_a_dict, "not a cache entry"),
        (_config_with_bad_values, "bad config"),
        (_config_not_a_candidate, "not a candidate"),
        (_other_triton_version, r"another build: triton '2.0.0' \(want '" + triton.__version__),
        (_other_source, "another build: source"),
    ],
)
def test_bad_entry_is_a_miss_with_one_warning_and_gets_rewritten(cache_folder, damage, message):
    x = torch.randn(100, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    scale(x, 2.0)
    [path] = _entries(cache_folder)
    good = path.read_bytes()
    path.write_bytes(damage(good, _full_key()))
    autotune.forget_picked()
    cache.reset_cache_stats()
    with pytest.warns(CacheWarning, match=message) as caught:
        torch.testing.assert_close(scale(x, 2.0), x * 2.0, rtol=0, atol=0)
    assert len(caught) == 1
    stats = cache.cache_stats()
    assert (stats["hits"], stats["misses"], stats["tuned"], stats["corrupt"]) == (0, 1, 1, 1)
    assert json.loads(path.read_bytes())["key"] == _full_key()  # rewritten, valid again
    assert _entries(cache_folder) == [path] and _temp_files(cache_folder) == []
    autotune.forget_picked()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale(x, 2.0)
    assert cache.cache_stats()["hits"] == 1


def test_a_damaged_file_warns_once_per_process(cache_folder):
    scale(torch.randn(100, device=DEVICE), 2.0)
    [path] = _entries(cache_folder)
    path.write_bytes(b"\x00garbage")
    cache.reset_cache_stats()
    with pytest.warns(CacheWarning) as caught:
        assert cache.lookup(_full_key()) is None
        assert cache.lookup(_full_key()) is None
    assert len(caught) == 1
    assert cache.cache_stats()["misses"] == 2


def test_entry_of_another_triton_version_lives_beside_ours(cache_folder, monkeypatch):
    x = torch.randn(100, device=DEVICE)
    monkeypatch.setattr(cache, "_triton_version", lambda: "2.0.0")
    scale(x, 2.0)
    [foreign] = _entries(cache_folder)
    monkeypatch.undo()
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(cache_folder))
    autotune.forget_picked()
    cache.reset_cache_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another version's file is not ours to complain about
        scale(x, 2.0)
    assert cache.cache_stats()["misses"] == 1
    entries = _entries(cache_folder)
    assert len(entries) == 2 and foreign in entries
    assert json.loads(foreign.read_text())["key"]["triton"] == "2.0.0"


# ---------------------------------------------------------------- failed writes


def test_unwritable_folder_warns_and_carries_on(cache_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(blocker))
    x = torch.randn(100, device=DEVICE)
    with pytest.warns(CacheWarning, match="cannot write"):
        torch.testing.assert_close(scale(x, 2.0), x * 2.0, rtol=0, atol=0)
    assert cache.cache_stats()["write_errors"] == 1
    scale(x, 2.0)  # the pick is still remembered in this process
    assert cache.cache_stats()["hits"] == 1


def test_failed_rename_leaves_no_temp_file(cache_folder, monkeypatch):
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", disk_full)
    with pytest.warns(CacheWarning, match="No space left"):
        scale(torch.randn(100, device=DEVICE), 2.0)
    assert list((cache_folder / "kernels").iterdir()) == [cache_folder / "kernels" / ".locks"]


# ---------------------------------------------------------------- processes tuning at once

N_RACE_KEYS = 3


@pytest.mark.parametrize("locking", [True, False], ids=["flock", "no-lock"])
def test_three_processes_tuning_the_same_keys_at_once(cache_folder, locking):
    barrier = cache_folder.parent / "barrier"
    barrier.mkdir()
    procs = [_start_worker(cache_folder, "race", str(barrier), str(i), str(int(locking))) for i in range(3)]
    try:
        deadline = time.monotonic() + 90
        while len(list(barrier.glob("ready-*"))) < 3:
            assert time.monotonic() < deadline, "workers never got ready"
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
            time.sleep(0.05)
        (barrier / "go").touch()
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert _temp_files(cache_folder) == []
    entries = _entries(cache_folder)
    assert len(entries) == N_RACE_KEYS
    for k in range(N_RACE_KEYS):
        key = cache.full_key("toy_race", _scale_kernel, {"k": k}, CONFIGS)
        assert cache.read_entry(key)["config"] in [c.to_dict() for c in CONFIGS]
    assert all(r["corrupt"] == 0 and r["write_errors"] == 0 for r in results)
    assert sum(r["hits"] + r["misses"] for r in results) == 3 * N_RACE_KEYS
    if locking and cache.fcntl is not None:
        # the lock makes the others wait and read the first one's entry: every key tuned exactly once
        assert sum(r["tuned"] for r in results) == N_RACE_KEYS


# ---------------------------------------------------------------- worker processes


def _worker_second() -> dict:
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    ok = torch.equal(scale(x, 3.0), x * 3.0)
    return {**cache.cache_stats(), "result_ok": ok}


def _worker_race(barrier: str, index: str, locking: str) -> dict:
    cache._LOCKING = locking == "1"
    plain_tune = autotune._tune

    def slow_tune(*args, **kwargs):
        time.sleep(0.3)  # widen the window in which the others look for the same key
        return plain_tune(*args, **kwargs)

    autotune._tune = slow_tune
    folder = Path(barrier)
    (folder / f"ready-{index}").touch()
    deadline = time.monotonic() + 90
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no go signal")
        time.sleep(0.005)
    for k in range(N_RACE_KEYS):
        pick_config("toy_race", _scale_kernel, {"k": k}, CONFIGS, lambda config: None)
    return cache.cache_stats()


if __name__ == "__main__":
    warnings.simplefilter("error", CacheWarning)
    mode, *rest = sys.argv[1:]
    result = {"second": _worker_second, "race": _worker_race}[mode](*rest)
    print(json.dumps(result))
