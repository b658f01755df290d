"""Run folders with non-zero adapters, and `peftkit serve` started for real on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import yaml

import peftkit
from peftkit.tasks.heads import build_classifier

from conftest import randomize

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
MAX_LENGTH = 32


def make_run(folder: Path, model_dir: Path, labels: list[str], seed: int, config=None, pair_column: str | None = None) -> Path:
    """A run folder as `peftkit train` writes it, with a randomised (non-zero) adapter. LoRA dropout is on (0.1),
    as in training: a server that left it on would answer at random."""
    torch.manual_seed(seed)
    model = peftkit.adapt(build_classifier(model_dir, len(labels), "mean"),
                          config or peftkit.LoraConfig(r=4, target_modules="all-linear", dropout=0.1))
    randomize(model, seed=seed, scale=0.3)
    folder.mkdir(parents=True)
    model.save_adapter(folder / "adapter")
    (folder / "labels.json").write_text(json.dumps({"labels": labels}))
    values = {"model": str(model_dir), "method": "lora", "pooling": "mean"}
    if pair_column:
        values["text_pair_column"] = pair_column
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    return folder


def edit_weights(adapter_dir: Path, change) -> None:
    """Rewrite an adapter's safetensors file through ``change(tensors) -> tensors`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(tensors), str(path), metadata=metadata)


def start_server(model_dir: Path, adapters: Path, log: Path, *extra: str):
    """(process, client) of a server on a free port; its output goes to ``log``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = open(log, "w")
    # classification settings; a generation server refuses them (its limit is --context_length; it never waits)
    settings = [] if "causal-lm" in extra else ["--max_length", str(MAX_LENGTH), "--pooling", "mean", "--max_wait_ms", "20"]
    process = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--base", str(model_dir), "--adapters",
                                str(adapters), "--port", str(port), *settings, *extra],
                               env=ENV, stdout=out, stderr=subprocess.STDOUT, text=True)
    out.close()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return process, client
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(log.read_text())


def stop_server(process, client) -> None:
    client.close()
    process.terminate()
    process.wait(timeout=10)


def run_probabilities(folder: Path, texts, pairs=None) -> torch.Tensor:
    """What `peftkit predict` computes for these rows (Run.probabilities), at the server's max_length."""
    from peftkit.train.run import Run

    run = Run(folder)
    run.config.max_length = MAX_LENGTH
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): the thread count can change the last bits
    try:
        return run.probabilities(texts, pairs)
    finally:
        torch.set_num_threads(threads)


def answer(response) -> torch.Tensor:
    """The probabilities of a /v1/classify answer, one row per text, as float32 (the server's precision)."""
    assert response.status_code == 200, response.text
    return torch.tensor([list(p["probabilities"].values()) for p in response.json()["predictions"]], dtype=torch.float32)
