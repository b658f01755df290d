"""Every method from the command line: trains, saves, reloads with identical outputs; AdaLoRA's budget, head-only's
feature cache and self-distillation inside the trainer."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.train.run import Run

from workflow_helpers import Probe, intent_rows, read_texts, tiny_model_dir, write_csv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {"model": tiny_model_dir(root), "train": write_csv(root / "train.csv", intent_rows(48, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(12, seed=2))}


def args(files, out, *extra):
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file", str(files["dev"]),
            "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--quiet", "true", "--max_length", "16",
            "--pooling", "mean", "--learning_rate", "1e-2", *extra]


@pytest.mark.parametrize("extra", [
    ["--method", "lora", "--lora.r", "4"],
    ["--method", "dora", "--dora.r", "4"],
    ["--method", "adalora", "--adalora.init_r", "4", "--adalora.target_r", "2"],
    ["--method", "bottleneck", "--bottleneck.variant", "houlsby", "--bottleneck.reduction_factor", "4"],
    ["--method", "bottleneck", "--bottleneck.variant", "pfeiffer"],
    ["--method", "bottleneck", "--bottleneck.variant", "parallel"],
    ["--method", "bitfit"],
    ["--method", "head"],
    ["--method", "head", "--head.cache_features", "true"],
    ["--method", "full", "--learning_rate", "1e-3"],
    ["--method", "lora", "--distill.teacher", "base", "--distill.alpha", "0.3"],
], ids=["lora", "dora", "adalora", "houlsby", "pfeiffer", "parallel", "bitfit", "head", "head-cached", "full",
        "lora-distill"])
def test_method_run_folder_reproduces_the_model_trained_in_memory(files, tmp_path, monkeypatch, extra):
    """The files of the run, reloaded into a fresh base model, give the dev probabilities that the trainer's own
    in-memory model gave when it was saved as the best one (not another reload of the same files)."""
    probe = Probe(monkeypatch)
    out = tmp_path / "run"
    assert main(args(files, out, *extra)) == 0
    report = json.loads((out / "report.json").read_text())
    assert probe.best, "the trainer never saved a best model"
    best = probe.best[-1]
    assert report["best_step"] == best.step
    texts = read_texts(files["dev"])
    torch.testing.assert_close(Run(out).probabilities(texts), best.probabilities, atol=1e-5, rtol=1e-4)
    # and the report describes that model
    targets = probe.trainer.targets["dev"]
    correct = sum(int(p == t) for p, t in zip(best.probabilities.argmax(-1).tolist(), targets))
    assert report["dev"]["accuracy"] == pytest.approx(correct / len(targets), abs=1e-9)
    in_memory_loss = torch.nn.functional.nll_loss(best.probabilities.log(), torch.tensor(targets)).item()
    assert report["dev"]["loss"] == pytest.approx(in_memory_loss, abs=1e-5)


def test_adalora_budget_shrinks_over_the_derived_run_length(files, tmp_path, capsys):
    out = tmp_path / "ada"
    assert main(args(files, out, "--method", "adalora", "--adalora.init_r", "6", "--adalora.target_r", "2",
                      "--adalora.deltaT", "1", "--epochs", "3", "--eval_strategy", "no")) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 18  # 48 examples / 8 per step x 3 epochs
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert len(kept) == 12 and sum(kept) == 2 * len(kept)  # 2 layers x 6 matrices; the final budget: target_r each on average
    assert main(args(files, tmp_path / "bad", "--method", "adalora", "--adalora.tinit", "10",
                      "--adalora.tfinal", "10")) == 2
    assert "phases do not fit" in capsys.readouterr().err


def test_head_feature_cache_gives_the_same_head(files, tmp_path):
    heads = []
    for cached in ("true", "false"):
        out = tmp_path / cached
        assert main(args(files, out, "--method", "head", "--head.cache_features", cached, "--epochs", "3")) == 0
        from safetensors.torch import load_file

        heads.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], atol=1e-6, rtol=1e-6)


def test_distillation_teacher_is_the_base_without_a_copy(files):
    from peftkit.tasks.heads import build_classifier
    from peftkit.train.config import DistillSection
    from peftkit.tasks import get_task
    from peftkit.tasks.data import LabelMap
    from peftkit.train.distill import Distiller

    base = build_classifier(files["model"], 3, "mean").eval()
    reference = copy.deepcopy(base)
    student = peftkit.adapt(base, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    params_before = sum(p.numel() for p in student.parameters())
    distiller = Distiller(DistillSection(teacher="base", alpha=0.5), student, get_task("classification"), LabelMap([]))
    assert distiller.mode == "hidden" and distiller.teacher is None
    batch = {"input_ids": torch.randint(1000, 2000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    student.train()
    teacher_out = distiller.teacher_outputs(batch)
    with torch.no_grad():
        expected = reference(**batch, output_hidden_states=True)
    torch.testing.assert_close(teacher_out.hidden_states[-1], expected.hidden_states[-1])
    assert student.training  # the teacher pass restores train mode
    assert not teacher_out.hidden_states[-1].requires_grad  # the teacher gets no gradients
    assert sum(p.numel() for p in student.parameters()) == params_before  # no second copy of the weights
    student.eval()  # with B = 0 the student equals the teacher: the distillation term starts at 0
    out = student(**batch, output_hidden_states=True)
    assert float(distiller.hidden_distance(out.hidden_states, teacher_out.hidden_states, batch["attention_mask"])) < 1e-10
    # and it becomes positive once the adapter moves
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    out = student(**batch, output_hidden_states=True)
    assert float(distiller.hidden_distance(out.hidden_states, teacher_out.hidden_states, batch["attention_mask"])) > 1e-6


def test_a_full_run_distilled_into_lora(files, tmp_path):
    teacher = tmp_path / "teacher"
    assert main(args(files, teacher, "--method", "full", "--learning_rate", "1e-3")) == 0
    student = tmp_path / "student"
    assert main(args(files, student, "--method", "lora", "--distill.teacher", str(teacher))) == 0
    report = json.loads((student / "report.json").read_text())
    assert report["dev"]["accuracy"] > 0.5
