"""Checkpoints carry a sha256: corrupt files are refused by name with the fix, kills mid-save stay loadable."""

from __future__ import annotations

import json

import pytest
import torch

import fxsparse.app.checkpoint
from fxsparse.app.checkpoint import load_checkpoint, save_checkpoint, sha256_file, sidecar_path


def _state(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"step": step, "weights": torch.randn(6, 42, generator=generator), "history": [0.5] * step}


def test_round_trip_writes_a_sidecar_and_a_plain_torch_file(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, _state(3))
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["sha256"] == sha256_file(path) and sidecar["size"] == path.stat().st_size
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], _state(3)["weights"])
    assert torch.load(path, weights_only=True)["step"] == 3  # still readable without fxsparse
    save_checkpoint(path, _state(4))
    assert "previous" not in json.loads(sidecar_path(path).read_text())  # only while a save is in flight
    assert load_checkpoint(path)["step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256"]


def _empty(data: bytes) -> bytes:
    return b""


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _extended(data: bytes) -> bytes:
    return data + b"\0" * 7


@pytest.mark.parametrize("damage, reason", [
    (_empty, "empty file"),
    (_truncated, "truncated"),
    (_flipped, "content was changed"),
    (_extended, "truncated or extended"),
])
def test_a_damaged_checkpoint_is_refused_by_name_with_the_fix(tmp_path, damage, reason):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(2))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=reason) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "--overwrite" in message and "older" in message


def test_missing_checksum_and_missing_file_are_clear_errors(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(_state(1), path)  # written without fxsparse: no sidecar
    with pytest.raises(ValueError, match=r"no readable checksum file 'last.pt.sha256'.*--overwrite"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "none.pt")


def test_a_file_that_matches_its_checksum_but_does_not_unpickle_is_a_clean_error(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a torch file at all")
    sidecar_path(path).write_text(json.dumps({"sha256": sha256_file(path), "size": path.stat().st_size}))
    with pytest.raises(ValueError, match=r"is corrupt \(.*Error") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("killed_at, expected_step", [(1, 1), (2, 1), (3, 2)])
def test_a_kill_at_any_rename_of_a_save_leaves_a_checkpoint_that_verifies(tmp_path, monkeypatch, killed_at,
                                                                          expected_step):
    # a save over an existing checkpoint renames three times: sidecar (new + previous sum), checkpoint,
    # sidecar (new sum only); a SIGKILL between any two must leave a pair that loads
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    real_replace = fxsparse.app.checkpoint.os.replace
    calls = {"n": 0}

    def killed(src, dst):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(fxsparse.app.checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["step"] == expected_step
    assert torch.equal(loaded["weights"], _state(expected_step)["weights"])
