"""run_loop and ``fxsparse finetune`` under ``torchrun --nproc_per_node 2`` (gloo, CPU)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_loop_worker  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
    reason="needs torch.distributed and torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(_free_port()), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two torchrun processes start torch and transformers: 20-40 s on 2 shared cores
def test_two_ranks_on_half_batches_equal_one_process_on_the_whole_batch(tmp_path):
    done = _torchrun(str(HERE / "ddp_loop_worker.py"), str(tmp_path / "ranks.pt"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert ranks["world"] == 2 and ranks["in_sync"]
    single = ddp_loop_worker.reference()
    assert ranks["tokens"] == single["tokens"] == ddp_loop_worker.STEPS * 4 * 12
    torch.testing.assert_close(torch.tensor(ranks["losses"]), torch.tensor(single["losses"]))
    base = ddp_loop_worker.build()
    for name, value in single["params"].items():
        torch.testing.assert_close(ranks["params"][name], value, msg=name)
        assert not torch.equal(value, base.get_parameter(name)), name  # training moved it


@pytest.mark.slow
def test_finetune_under_torchrun_writes_once_from_rank_zero(tmp_path):
    out = tmp_path / "run"
    done = _torchrun("-m", "fxsparse.app.cli", "finetune", "--model", "tiny-llama", "--steps", "2", "--train-n", "32",
                     "--eval-n", "4", "--batch-size", "4", "--warmup", "0", "--no-progress", "--threads", "1",
                     "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train longer:") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert (out / "adapter").is_dir() and (out / "checkpoints" / "last.pt.sha256").is_file()
