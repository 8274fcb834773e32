"""The zoo's CI subset: each architecture reaches at least the stage ``benchmarks/results/zoo.csv`` records for it
(so a regression fails here), and none is ever inexact. Plus the harness's own arithmetic on hand-made inputs.

The whole zoo is ``python benchmarks/zoo.py``; this file runs a representative subset in this process, one
architecture per test, each under the harness's per-architecture CPU-time limit.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from fxsparse.structure import FFN, Attention, Block, Projection, Structure

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _load():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbour _env
    return importlib.import_module("zoo")


zoo = _load()
RECORDED = zoo.read_results() if zoo.CSV_PATH.exists() else {}

# One or more architectures per family of issue 10 (the default lane; each takes a few seconds).
CI_ARCHS = [
    "llama", "mistral", "qwen2", "granite",                # LLaMA-like; mistral/qwen2: sliding window
    "gpt2", "gpt_bigcode",                                   # GPT-2 Conv1D; fused QKV with MQA
    "phi3", "gpt_neox", "phi", "persimmon",                  # fused QKV (phi3, NeoX interleaved); partial rotary
    "bloom", "mpt", "falcon", "openai-gpt",                  # written-out / eager-only attention, ALiBi, baddbmm,
    "gpt_neox_japanese",                                     # a key permuted to (B, H, D, T), 3-D and 4-D q/k/v
    "mixtral", "qwen2_moe", "olmoe", "granitemoe",           # mixture of experts, shared experts
    "glm4_moe", "jamba",                                     # heterogeneous blocks (dense then MoE; mamba + attention)
    "gemma2", "gemma3_text", "cohere2",                      # sliding window / per-layer types, soft-capping
    "gpt_oss", "beam", "hrm_text",                           # sinks, a per-head output-gate bias: heads kept in
                                                             # place; a looped decoder (blocks run 6 times)
    "bitnet", "dory",                                        # FFN channels kept in place (sub-norm; nGPT scales)
    "deepseek_v3", "minicpm3",                               # multi-head latent attention
    "qwen3", "olmo2",                                        # q/k norms (per head; over the whole projection)
    "diffllama",                                             # differential attention
    "opt", "bart",                                           # OPT's FFN; a decoder of an encoder-decoder family
]
# Slower ones, run with the slow lane.
SLOW_ARCHS = ["gemma", "stablelm", "starcoder2", "codegen", "llama4_text", "nemotron_h", "biogpt", "exaone4"]
RANK = {stage: i for i, stage in enumerate(zoo.STAGES)}


def _rank(row: dict) -> int:
    return RANK.get(row["stage"], -1) if row["status"] in zoo.IN_SCOPE else -1


def _check(arch: str) -> None:
    if arch not in RECORDED:
        pytest.skip(f"{arch} is not in benchmarks/results/zoo.csv (run python benchmarks/zoo.py)")
    row = zoo.run_arch(arch)
    want = RECORDED[arch]
    assert row["status"] != "inexact", f"{arch}: {row['reason']}"
    if want["status"] == "out-of-scope":
        assert row["status"] == "out-of-scope", f"{arch} was out of scope, now {row['status']}: {row['reason']}"
        return
    assert _rank(row) >= _rank(want), (
        f"{arch} regressed: now {row['status']} at {row['stage']} ({row['reason']}); the table records "
        f"{want['status']} at {want['stage']} ({want['reason']})")


@pytest.mark.parametrize("arch", CI_ARCHS)
def test_zoo_arch(arch):
    _check(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_ARCHS)
def test_zoo_arch_slow(arch):
    _check(arch)


def test_subset_is_large_enough_and_known():
    known = set(zoo.all_archs())
    assert len(CI_ARCHS) >= 25 and len(set(CI_ARCHS)) == len(CI_ARCHS)
    present = [a for a in CI_ARCHS + SLOW_ARCHS if a in known]
    assert len([a for a in CI_ARCHS if a in known]) >= 25, sorted(set(CI_ARCHS) - known)
    assert present


def test_table_covers_the_mapping_and_counts_add_up():
    if not RECORDED:
        pytest.skip("no zoo table yet")
    rows = list(RECORDED.values())
    assert all(row["status"] in ("pass", "fail", "inexact", "out-of-scope", "cannot-build") for row in rows)
    assert all(row["stage"] in zoo.STAGES for row in rows)
    assert all(row["reason"] and "\n" not in row["reason"] and "Traceback" not in row["reason"]
               for row in rows if row["status"] != "pass")
    counts = zoo.counts(rows)
    assert counts["in scope"] == counts["pass"] + counts["fail"] + counts["inexact"]
    assert counts["architectures"] == counts["in scope"] + counts["out-of-scope"] + counts["cannot-build"]
    assert zoo.summary_line(counts) in zoo.MD_PATH.read_text()
    import re

    import transformers

    written_with = re.search(r"^transformers (\S+),", zoo.MD_PATH.read_text().splitlines()[2])
    if written_with is None or written_with.group(1) != transformers.__version__:
        pytest.skip(f"the table was written with transformers {written_with and written_with.group(1)}, this is "
                    f"{transformers.__version__} (make setup pins the one in constraints.txt)")
    missing = set(zoo.all_archs()) - set(RECORDED)
    assert not missing, f"not in the table (rerun python benchmarks/zoo.py): {sorted(missing)}"


def test_table_is_for_the_pinned_transformers():
    """make setup installs the transformers of constraints.txt: the committed table must be written with it."""
    import re

    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    header = zoo.MD_PATH.read_text().splitlines()[2]
    assert re.match(rf"transformers {re.escape(pins['transformers'])},", header), (header, pins["transformers"])


# ---------------------------------------------------------------- the harness's arithmetic


def test_tiny_configs_use_each_configs_own_names():
    llama = zoo.tiny_config("llama")
    assert (llama.hidden_size, llama.num_attention_heads, llama.num_key_value_heads, llama.head_dim,
            llama.intermediate_size, llama.num_hidden_layers, llama.vocab_size) == (48, 6, 2, 8, 80, 2, 128)
    gpt2 = zoo.tiny_config("gpt2")  # n_embd, n_head, n_inner, n_layer
    assert (gpt2.n_embd, gpt2.n_head, gpt2.n_inner, gpt2.n_layer) == (48, 6, 80, 2)
    gemma3 = zoo.tiny_config("gemma3_text")  # one layer of each type, window smaller than the example
    assert sorted(set(gemma3.layer_types)) == ["full_attention", "sliding_attention"]
    assert len(gemma3.layer_types) == gemma3.num_hidden_layers and gemma3.sliding_window == 4
    jamba = zoo.tiny_config("jamba")  # hybrid: the attention layer is one of the two
    assert jamba.num_hidden_layers == 2 and jamba.attn_layer_period == 2 and jamba.attn_layer_offset == 1
    mixtral = zoo.tiny_config("mixtral")
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (4, 2)


def test_layer_indices_keep_one_of_each_type():
    class Base:
        layer_types = ["linear", "linear", "linear", "full", "linear", "full"]

    assert zoo._layer_indices(Base(), 2) == [0, 3]
    assert zoo._layer_indices(object(), 2) == [0, 1]


def test_one_line_reasons():
    try:
        try:
            raise ValueError("mamba_n_heads must divide mamba_expand * hidden_size")
        except ValueError as cause:
            raise RuntimeError("Class validation error for validator 'validate_architecture':\n    more") from cause
    except RuntimeError as exc:
        assert zoo.one_line(exc) == "ValueError: mamba_n_heads must divide mamba_expand * hidden_size"
    line = zoo.one_line(RuntimeError("Could not guard on data-dependent expression Eq(u0, 0)\nlong trace"))
    assert line.startswith("data-dependent control flow: RuntimeError: Could not guard") and "\n" not in line
    wrapped = zoo.one_line(ValueError("pass 'find_structure' failed (after ['capture_graph']): no attention"))
    assert wrapped == "ValueError: find_structure: no attention"
    assert len(zoo.one_line(ValueError("x" * 1000))) == 220


def _structure(heads=6, kv=2, head_dim=8, channels=80, blocks=2, ffn=True) -> Structure:
    def attention(i):
        p = f"model.layers.{i}.self_attn"
        return Attention(Projection(f"{p}.q_proj"), Projection(f"{p}.k_proj"), Projection(f"{p}.v_proj"),
                         Projection(f"{p}.o_proj"), heads, kv, head_dim)

    def mlp(i):
        p = f"model.layers.{i}.mlp"
        return FFN(Projection(f"{p}.up_proj"), Projection(f"{p}.gate_proj"), Projection(f"{p}.down_proj"), channels)

    return Structure(blocks=[Block(i, attention(i), mlp(i) if ffn else None) for i in range(blocks)])


def _want(**changes) -> dict:
    want = {"heads": 6, "kv_heads": 2, "head_dims": {8}, "widths": {80, 192}, "layers": 2, "moe": False,
            "attentions": {"model.layers.0.self_attn": "LlamaAttention (SDPA)",
                           "model.layers.1.self_attn": "LlamaAttention (SDPA)"}}
    want.update(changes)
    return want


def test_check_structure_against_the_config():
    assert zoo.check_structure(_structure(), _want()) == []
    assert zoo.check_structure(_structure(kv=6), _want()) == ["block 0: 6 KV heads, config 2",
                                                              "block 1: 6 KV heads, config 2"]
    assert zoo.check_structure(_structure(head_dim=16), _want())[0] == "block 0: head size 16, config [8]"
    assert zoo.check_structure(_structure(channels=40), _want())[0] == "block 0: 40 FFN channels, config [80, 192]"
    assert zoo.check_structure(_structure(blocks=1), _want()) == [
        "1 of 2 attentions found, not LlamaAttention (SDPA)", "1 FFNs found in 2 dense layers"]
    assert zoo.check_structure(_structure(ffn=False), _want(moe=True)) == []  # experts left dense: fine


def test_counts_and_summary():
    rows = [{"status": s} for s in ("pass", "pass", "fail", "inexact", "out-of-scope", "cannot-build")]
    counts = zoo.counts(rows)
    assert (counts["in scope"], counts["pass"], counts["fail"], counts["inexact"]) == (4, 2, 1, 1)
    assert zoo.summary_line(counts).startswith("6 architectures: 4 in scope, 2 pass (50%), 1 fail, 1 inexact")


def test_per_architecture_time_limit():
    assert zoo.run_arch("llama")["status"] == "pass"  # imports done: a timeout must not land in one
    row = zoo.run_arch("llama", timeout=0.3)  # CPU seconds: stops in whatever stage it reached
    assert "timed out after 0 s of CPU in" in row["reason"] and row["status"] in ("fail", "cannot-build")
    assert row["stage"] in zoo.STAGES
    row = zoo.run_arch("llama")  # nothing left armed from the previous call
    assert row["status"] == "pass", row["reason"]


def _burn_cpu_until(limit) -> None:
    while not limit.fired:
        sum(i * i for i in range(1000))


def test_time_limit_survives_a_swallowed_signal():
    """The CI failure of stop 16: the timer fired inside a gc callback, whose exception the interpreter drops.
    The limit fires again until one lands, and nothing stays armed after it."""
    import signal

    previous = signal.getsignal(signal.SIGPROF)
    swallowed = 0
    with pytest.raises(zoo.ArchTimeout):
        with zoo._CpuLimit(0.05) as limit:
            try:
                _burn_cpu_until(limit)
            except zoo.ArchTimeout:
                swallowed += 1  # what the interpreter does to an exception raised in a gc callback
            while True:  # a one-shot timer would leave this loop running forever
                sum(i * i for i in range(1000))
    assert swallowed == 1
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) is previous


@pytest.mark.slow
def test_worker_processes():
    rows = zoo.run_zoo(["gpt2", "mamba"], jobs=2, timeout=60, log=lambda line: None)
    assert [(r["arch"], r["status"]) for r in rows] == [("gpt2", "pass"), ("mamba", "out-of-scope")]
