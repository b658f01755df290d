"""Killed-and-resumed runs, and runs under torchrun (DDP, FSDP2), compared with a plain single-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workflow_helpers import intent_rows, tiny_model_dir, write_csv

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def base_args(model, train, dev, out, *extra):
    return ["train", "--model", str(model), "--train_file", str(train), "--dev_file", str(dev),
            "--output_dir", str(out), "--batch_size", "8", "--max_length", "16", "--quiet", "true",
            "--num_threads", "1", "--learning_rate", "3e-3", *extra]


def cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {"model": tiny_model_dir(root, dropout=0.1), "model0": tiny_model_dir(root / "nodrop", dropout=0.0),
            "train": write_csv(root / "train.csv", intent_rows(240, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(30, seed=2))}


RESUME_EXTRA = ["--epochs", "3", "--save_steps", "3", "--lora.r", "4", "--lora.dropout", "0.1", "--eval_strategy", "no"]


def assert_same_tensors(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys() and got
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0)


def assert_resumed_like(killed: Path, whole: Path, result, step: int) -> None:
    """The resumed run started from checkpoint `step` (not from scratch) and ended with the uninterrupted run's
    final weights (eval_strategy no: the result is the last step, whatever a dev set would prefer)."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step-{step:09d} (step {step}," in result.stdout
    assert_same_tensors(adapter(killed), adapter(whole), atol=1e-6)
    report_whole = json.loads((whole / "report.json").read_text())
    report_killed = json.loads((killed / "report.json").read_text())
    assert report_killed["steps"] == report_whole["steps"] == 90
    losses = [h["train_loss"] for h in report_whole["history"] if "train_loss" in h]
    assert [h["train_loss"] for h in report_killed["history"] if "train_loss" in h] == pytest.approx(losses, rel=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    whole = tmp_path_factory.mktemp("whole") / "run"
    result = cli(base_args(files["model"], files["train"], files["dev"], whole, *RESUME_EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]
    return whole


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(files, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli",
                                *base_args(files["model"], files["train"], files["dev"], killed, *RESUME_EXTRA)],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    target = killed / "checkpoints" / "step-000000042"  # 30 steps per epoch: step 42 is inside epoch 2
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "report.json").exists()
    latest = max(int(p.name.removeprefix("step-")) for p in (killed / "checkpoints").glob("step-*"))
    assert 42 <= latest < 90
    resumed = cli(base_args(files["model"], files["train"], files["dev"], killed, *RESUME_EXTRA, "--resume"))
    assert_resumed_like(killed, uninterrupted, resumed, latest)


# The trainer in a child process whose N-th checkpoint write dies half-way through the tensors file: the
# safetensors file is written, cut to half its size, and the process SIGKILLs itself before anything is renamed.
DYING_WRITER = """
import os, signal, sys
import safetensors.torch
import peftkit.train.checkpoint as checkpoint

kill_at, calls, write = int(os.environ["KILL_AT_CHECKPOINT"]), [0], checkpoint.write_safetensors
save_file = safetensors.torch.save_file

def half_then_die(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as handle:
        handle.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

def dying_write(path, tensors, metadata=None):
    calls[0] += 1
    if calls[0] == kill_at:
        safetensors.torch.save_file = half_then_die
    return write(path, tensors, metadata)

checkpoint.write_safetensors = dying_write
from peftkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_then_resume_matches_an_uninterrupted_run(files, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    args = base_args(files["model"], files["train"], files["dev"], killed, *RESUME_EXTRA)
    dying = subprocess.run([sys.executable, "-c", DYING_WRITER, *args], env={**ENV, "KILL_AT_CHECKPOINT": "15"},
                           capture_output=True, text=True, timeout=600)
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-3000:]
    checkpoints = killed / "checkpoints"
    # the 15th checkpoint (step 45) was being written: a partial file in a hidden temporary folder (atomic.write_dir),
    # itself under a temporary name (atomic.atomic_write), never renamed
    partial = [p for p in checkpoints.glob(".step-000000045.tmp-*/*") if p.is_file()]
    assert partial and all(p.name.startswith(".") and ".tmp-" in p.name for p in partial), list(checkpoints.iterdir())
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000000039", "step-000000042"]
    resumed = cli([*args, "--resume"])
    assert_resumed_like(killed, uninterrupted, resumed, 42)


def _torchrun(args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "peftkit.cli", *args], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    """One process, global batch 8, no dropout, no evaluation before the end: the reference for DDP and FSDP2."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = cli(base_args(files["model0"], files["train"], files["dev"], out, *DISTRIBUTED_EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


DISTRIBUTED_EXTRA = ["--epochs", "1", "--lora.r", "4", "--lora.dropout", "0.0", "--eval_strategy", "no"]


def assert_matches_single(run: Path, single: Path) -> None:
    """Final weights within 1e-5 absolute (+1e-4 relative: sums are reduced in another order); per-step training
    loss and gradient norm within 1e-4 / 1e-3 relative (neither doubled nor halved by the process count)."""
    one, two = adapter(single), adapter(run)
    assert one.keys() == two.keys() and one
    for key in one:
        assert two[key].shape == one[key].shape, key  # whole tensors, not shards
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    history_one = [h for h in json.loads((single / "report.json").read_text())["history"] if "train_loss" in h]
    history_two = [h for h in json.loads((run / "report.json").read_text())["history"] if "train_loss" in h]
    assert len(history_one) == len(history_two) == 30
    for a, b in zip(history_one, history_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


def test_ddp_two_processes_match_one_with_the_same_global_batch(files, single, tmp_path):
    ddp = tmp_path / "ddp"
    args = base_args(files["model0"], files["train"], files["dev"], ddp, *DISTRIBUTED_EXTRA)
    args[args.index("--batch_size") + 1] = "4"  # per process: 2 x 4 = the single run's 8
    args += ["--gradient_checkpointing", "true"]  # non-reentrant: works with DDP, same gradients
    result = _torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_single(ddp, single)


def test_fsdp2_two_processes_match_one_with_the_same_global_batch(files, single, tmp_path):
    out = tmp_path / "fsdp"
    args = base_args(files["model0"], files["train"], files["dev"], out, *DISTRIBUTED_EXTRA, "--distributed", "fsdp")
    args[args.index("--batch_size") + 1] = "4"
    result = _torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_single(out, single)
    from peftkit.train.run import Run

    report = json.loads((out / "report.json").read_text())
    assert Run(out).evaluate(files["dev"])["accuracy"] == pytest.approx(report["dev"]["accuracy"])
