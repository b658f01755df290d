"""A training run that never lies, never half-writes, and refuses what it would ignore: divergence, every method
from the bare CLI, unwritable outputs, file modes, crash-safe folder swaps, accumulation windows, config refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import atomic, io
from peftkit.cli import main
from peftkit.train import trainer as T

from workflow_helpers import intent_rows, tiny_model_dir, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return {"model": tiny_model_dir(root), "train": write_csv(root / "train.csv", intent_rows(48, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(12, seed=2)), "root": root}


def args(files, out, *extra):
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file", str(files["dev"]),
            "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--quiet", "true", "--max_length", "16",
            "--pooling", "mean", *extra]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def no_half_written_files(root: Path) -> None:
    """Every file under root is complete: no temporary leftovers, every safetensors and JSON file parses."""
    for path in root.rglob("*"):
        assert ".tmp-" not in path.name and ".old-" not in path.name, path
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ 1. divergence
@pytest.mark.parametrize("evaluation, reason", [
    (["--eval_strategy", "steps", "--eval_steps", "1"], "the dev loss is not finite"),
    (["--eval_strategy", "no"], "more than max_skipped_steps = 2"),
], ids=["dev-loss", "skipped-steps"])
def test_a_diverged_run_exits_3_and_saves_nothing_non_finite(files, tmp_path, capsys, evaluation, reason):
    out = tmp_path / "run"
    code = main(args(files, out, "--learning_rate", "1e6", "--max_skipped_steps", "2", *evaluation))
    captured = capsys.readouterr()
    assert code == 3
    assert "training diverged" in captured.err and reason in captured.err and "Lower the learning rate" in captured.err
    assert "Traceback" not in captured.err
    assert captured.err.count("the step was skipped") <= 2
    assert not any("nan" in line and "(best)" in line for line in captured.out.splitlines())
    assert not (out / "report.json").exists() and not (out / "adapter").exists()  # no final outputs at all
    for path in out.rglob("*.safetensors"):  # an earlier best or checkpoint may exist: never a non-finite one
        assert all_finite(path), path


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(files, tmp_path, capsys, monkeypatch):
    original = T.Trainer._micro_step
    calls = []

    def poisoned(self, *a, **k):
        loss = original(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:  # the second optimizer step: NaN loss and gradients
            for p in self.params:
                p.grad.fill_(float("nan"))
            return float("nan")
        return loss

    monkeypatch.setattr(T.Trainer, "_micro_step", poisoned)
    out = tmp_path / "run"
    assert main(args(files, out, "--learning_rate", "1e-2", "--epochs", "1")) == 0
    assert capsys.readouterr().err.count("the step was skipped") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6 and report["skipped_steps"] == 1
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    tensors = load_file(str(last / "tensors.safetensors"))
    assert float(tensors["optimizer.0.step"]) == 5  # 6 steps, 5 updates
    assert all_finite(out / "adapter" / "adapter_model.safetensors")


# ------------------------------------------------------------------------------ 2. every method, bare CLI
@pytest.mark.parametrize("method", ["bottleneck", "bitfit", "head", "dora", "adalora", "full"])
def test_every_method_trains_from_the_cli_with_only_method(files, tmp_path, method):
    out = tmp_path / method  # no config file and no --train_file: the embedded default (demo data)
    assert main(["train", "--method", method, "--model", str(files["model"]), "--output_dir", str(out),
                 "--max_steps", "2", "--max_length", "16", "--quiet", "true"]) == 0
    assert json.loads((out / "report.json").read_text())["method"] == method
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["learning_rate"] is None and "lora" not in saved  # the demo's LoRA settings stay with LoRA


def test_the_embedded_default_keeps_its_lora_settings():
    from peftkit.tasks.demo import DATA_DIR
    from peftkit.train.config import load

    config = load(DATA_DIR / "demo.yaml", [], embedded=True)
    assert config.method == "lora" and config.learning_rate == 2e-3
    assert load(DATA_DIR / "demo.yaml", ["--lora.r", "4"], embedded=True).learning_rate == 2e-3


# --------------------------------------------------------------------------- 3. outputs that cannot be written
def test_an_output_dir_under_a_file_exits_2_with_a_message(files, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(args(files, blocker / "run", "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "x"


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from peftkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("limit", [30_000, 60_000])  # fails at the best adapter / at the first checkpoint
def test_a_full_disk_exits_2_and_leaves_nothing_half_written(files, tmp_path, limit):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=limit), *args(files, out, "--max_steps", "2")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot write" in done.stderr and "File too large" in done.stderr
    assert "Traceback" not in done.stderr
    no_half_written_files(out)


# --------------------------------------------------------------------------------------------- 4. file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        io.write_adapter(tmp_path / "adapter", {"w": torch.ones(2)}, {"peft_type": "LORA"}, {})
        atomic.write_json(tmp_path / "labels.json", {"labels": ["a"]})
    finally:
        os.umask(old)
    for path in (tmp_path / "adapter" / io.WEIGHTS_NAME, tmp_path / "adapter" / io.CONFIG_NAME, tmp_path / "labels.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask


# ----------------------------------------------------------------------------------- 5. crash-safe folder swaps
def _crash_at(point: int, work) -> int:
    """Run ``work`` in a forked child that dies (no clean-up, like a kill) at the point-th rename, fsync or
    removal; returns the child's exit status: 0 when it finished before reaching that point."""
    pid = os.fork()
    if pid == 0:
        import shutil

        seen = [0]

        def dying(real):
            def wrapper(*a, **k):
                seen[0] += 1
                if seen[0] == point:
                    os._exit(9)
                return real(*a, **k)
            return wrapper

        os.replace = dying(os.replace)
        os.fsync = dying(os.fsync)
        shutil.rmtree = dying(shutil.rmtree)
        try:
            work()
        except BaseException:
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _adapter(tag: float):
    return {"w": torch.full((4,), tag)}, {"peft_type": "LORA", "tag": tag}


def _read_pair(directory: Path) -> tuple[float, float]:
    return float(load_file(str(directory / io.WEIGHTS_NAME))["w"][0]), json.loads((directory / io.CONFIG_NAME).read_text())["tag"]


def test_an_adapter_folder_is_old_or_new_whatever_the_crash_point(tmp_path):
    recover = atomic.recover_dir
    outcomes = set()
    for point in range(1, 40):
        target = tmp_path / f"case{point}" / "adapter"
        io.write_adapter(target, *_adapter(1.0), {})
        io.write_adapter(target / "other", *_adapter(5.0), {})  # a second adapter saved in a sub-folder
        status = _crash_at(point, lambda: io.write_adapter(target, *_adapter(2.0), {}))
        assert status in (0, 9)
        recover(target)
        pair = _read_pair(target)
        assert pair in ((1.0, 1.0), (2.0, 2.0)), (point, pair)  # never the new weights with the old config
        assert _read_pair(target / "other") == (5.0, 5.0)  # the sub-folder survives either way
        assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # no leftovers once recovered
        outcomes.add(pair)
        if status == 0:
            break
    assert outcomes == {(1.0, 1.0), (2.0, 2.0)} and status == 0


def test_a_checkpoint_listing_recovers_an_interrupted_swap(tmp_path):
    from peftkit.train import checkpoint as C

    for point in range(1, 20):
        root = tmp_path / f"case{point}"
        C.save(root, 1, {"x": torch.ones(2)}, {"step": 1, "tag": "old"}, keep=2)
        status = _crash_at(point, lambda: C.save(root, 1, {"x": torch.zeros(2)}, {"step": 1, "tag": "new"}, keep=2))
        found = C.complete(root)
        assert [p.name for p in found] == ["step-000000001"], point
        tensors, state = C.load(found[0])
        assert (state["tag"], float(tensors["x"][0])) in (("old", 1.0), ("new", 0.0))
        if status == 0:
            break
    assert status == 0


# -------------------------------------------------------------------------------------- 6. predict arguments
def test_predict_with_mismatched_text_pairs_exits_2(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out, "--max_steps", "1", "--eval_strategy", "no")) == 0
    capsys.readouterr()
    assert main(["predict", "--run", str(out), "--text", "a", "--text", "b", "--text_pair", "x"]) == 2
    err = capsys.readouterr().err
    assert "2 --text but 1 --text_pair" in err and "Traceback" not in err


# ------------------------------------------------------------------------------- 7. gradient accumulation
def _first_step_gradients(files, tmp_path, monkeypatch, name, batch_size, accumulation):
    from peftkit.train.config import load

    class Captured(Exception):
        pass

    grads = {}

    def capture(self, *a, **k):
        grads.update({n: p.grad.clone() for n, p in self.named_params.items()})
        raise Captured

    monkeypatch.setattr(T.Trainer, "_optimizer_step", capture)
    config = load(None, args(files, tmp_path / name, "--max_steps", "1", "--lora.dropout", "0", "--batch_size",
                             str(batch_size), "--gradient_accumulation_steps", str(accumulation),
                             "--train_file", str(files["train10"]))[1:])
    with pytest.raises(Captured):
        T.train(config)
    return grads


def test_a_partial_accumulation_window_has_the_gradient_of_one_batch(files, tmp_path, monkeypatch):
    files = dict(files, train10=write_csv(tmp_path / "train10.csv", intent_rows(10, seed=3)))
    # 10 examples, batches of 4 with 4 per step: one window of 3 batches (4 + 4 + 2), short of the full 4
    windowed = _first_step_gradients(files, tmp_path, monkeypatch, "a", 4, 4)
    whole = _first_step_gradients(files, tmp_path, monkeypatch, "b", 10, 1)
    assert windowed.keys() == whole.keys()
    assert any(float(g.abs().max()) > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(windowed[name], whole[name], atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------- 8. accepted-but-ignored settings
@pytest.mark.parametrize("extra, message", [
    (["--method", "head", "--distill.teacher", "base"], "distill: method 'head' computes its logits its own way"),
    (["--distill.teacher", "base", "--distill.temperature", "3"], "temperature only applies in logits mode"),
    (["--distill.teacher", "some/run", "--distill.hidden_loss", "cosine"], "hidden_loss only applies in hidden mode"),
    (["--distill.teacher", "some/run", "--distill.mode", "logits", "--distill.layers", "[1]"],
     "layers only applies in hidden mode"),
    (["--method", "dora", "--dora.use_dora", "false"], "dora.use_dora: false would train plain LoRA"),
], ids=["distill-head", "temperature-hidden", "hidden_loss-logits", "layers-logits", "dora-off"])
def test_settings_that_would_be_ignored_are_refused(files, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(args(files, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_stored_distill_config_reopens(files, tmp_path):
    """A run folder written with every distill key (as older versions did) still opens."""
    from peftkit.train.config import RunConfig

    stored = {"method": "lora", "distill": {"teacher": "base", "temperature": 2.0, "hidden_loss": "mse"}}
    assert RunConfig.model_validate(stored, context={"stored": True}).distill.resolved_mode == "hidden"
    assert "temperature" not in RunConfig.model_validate({"method": "lora", "distill": {"teacher": "base"}}).to_yaml()
