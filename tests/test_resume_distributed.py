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


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(files, tmp_path):
    extra = ["--epochs", "3", "--save_steps", "3", "--lora.r", "4", "--lora.dropout", "0.1"]
    whole = tmp_path / "whole"
    assert cli(base_args(files["model"], files["train"], files["dev"], whole, *extra)).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli",
                                *base_args(files["model"], files["train"], files["dev"], killed, *extra)],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    target = killed / "checkpoints" / "step-000000042"  # 30 steps per epoch: step 42 is inside epoch 2
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "the run ended before it could be killed"
    assert not (killed / "report.json").exists()

    resumed = cli(base_args(files["model"], files["train"], files["dev"], killed, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    expected, got = adapter(whole), adapter(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    report_whole = json.loads((whole / "report.json").read_text())
    report_killed = json.loads((killed / "report.json").read_text())
    assert report_killed["dev"]["accuracy"] == report_whole["dev"]["accuracy"]
    assert report_killed["dev"]["loss"] == pytest.approx(report_whole["dev"]["loss"], abs=1e-6)


def _torchrun(args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "peftkit.cli", *args], env=ENV, capture_output=True, text=True, timeout=600)


def test_ddp_two_processes_match_one_with_the_same_global_batch(files, tmp_path):
    extra = ["--epochs", "1", "--lora.r", "4", "--lora.dropout", "0.0", "--eval_strategy", "no"]
    single = tmp_path / "single"
    assert cli(base_args(files["model0"], files["train"], files["dev"], single, *extra)).returncode == 0
    ddp = tmp_path / "ddp"
    args = base_args(files["model0"], files["train"], files["dev"], ddp, *extra)
    args[args.index("--batch_size") + 1] = "4"  # per process: 2 x 4 = the single run's 8
    args += ["--gradient_checkpointing", "true"]  # non-reentrant: works with DDP, same gradients
    result = _torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = adapter(single), adapter(ddp)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    history_one = [h for h in json.loads((single / "report.json").read_text())["history"] if "train_loss" in h]
    history_two = [h for h in json.loads((ddp / "report.json").read_text())["history"] if "train_loss" in h]
    assert len(history_one) == len(history_two) == 30
    for a, b in zip(history_one, history_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)  # not doubled, not halved
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


def test_fsdp2_trains_and_saves_a_full_adapter(files, tmp_path):
    out = tmp_path / "fsdp"
    args = base_args(files["model0"], files["train"], files["dev"], out, "--epochs", "1", "--lora.r", "4",
                     "--distributed", "fsdp", "--batch_size", "4")
    result = _torchrun(args)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = adapter(out)
    lora_A = [k for k in tensors if k.endswith("lora_A.weight")]
    assert lora_A and all(tensors[k].shape[0] == 4 for k in lora_A)  # whole tensors, not shards
    from peftkit.train.run import Run

    report = json.loads((out / "report.json").read_text())
    assert Run(out).evaluate(files["dev"])["accuracy"] == pytest.approx(report["dev"]["accuracy"])
