"""The method registry: one entry per method (a toy method added from the test folder works everywhere, the CLI
included), the CLI recipe against the library defaults, DoRA and full fine-tuning as entries, the paired file
hooks, and the public adapter-name checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.layers.base import AdapterLayer
from peftkit.train.config import RunConfig, load

from conftest import MLP, randomize, tiny_bert
from workflow_helpers import Probe, intent_rows, read_texts, tiny_model_dir, write_csv

BERT_X = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])}


@pytest.fixture
def toy():
    """The toy method of tests/toy_method, registered for one test only."""
    from toy_method.method import ToyMethod

    method = peftkit.register_method(ToyMethod())
    yield method
    peftkit.unregister_method("toy")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {"model": tiny_model_dir(root), "train": write_csv(root / "train.csv", intent_rows(48, seed=1)),
            "dev": write_csv(root / "dev.csv", intent_rows(12, seed=2))}


def train_args(files, out, *extra):
    return ["train", "--model", str(files["model"]), "--train_file", str(files["train"]), "--dev_file", str(files["dev"]),
            "--output_dir", str(out), "--epochs", "2", "--batch_size", "8", "--quiet", "true", "--max_length", "16",
            "--pooling", "mean", *extra]


def adapter_layers(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, AdapterLayer)]


# ------------------------------------------------------------------------------------------ the toy method
def test_a_toy_method_trains_from_the_cli_and_its_run_reloads_as_trained(toy, files, tmp_path, monkeypatch):
    probe = Probe(monkeypatch)
    out = tmp_path / "run"
    assert main(train_args(files, out, "--method", "toy", "--toy.shared_std", "0.5", "--learning_rate", "5e-2")) == 0
    assert probe.best, "the trainer never saved a best model"
    assert RunConfig.model_validate({"method": "toy", "toy": {"shared_std": 0.5}}).peak_learning_rate == toy.default_lr
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(key.startswith("base_model.model.toy_shared.") for key in saved)  # the extra tensor went through export
    scales = [value for key, value in saved.items() if key.endswith(".toy_scale")]
    assert scales and all(torch.count_nonzero(s) > 0 for s in scales)  # it trained
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "TOY"
    assert "toy:\n  target_modules: all-linear\n  shared_std: 0.5" in (out / "config.yaml").read_text()
    from peftkit.train.run import Run

    torch.testing.assert_close(Run(out).probabilities(read_texts(files["dev"])), probe.best[-1].probabilities,
                               atol=1e-5, rtol=1e-4)


def test_train_help_and_config_know_a_method_registered_after_import(toy, capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "toy.shared_std (default 1.0): spread of the shared random matrix M" in text
    assert "toy.target_modules" in text
    config = load(None, ["--method", "toy", "--toy.shared_std", "2"])
    assert config.method_config() == toy.config_cls(shared_std=2.0)
    with pytest.raises(peftkit.ConfigError, match=r"toy.shared_std: shared_std must be positive, got -1"):
        load(None, ["--method", "toy", "--toy.shared_std", "-1"])
    with pytest.raises(peftkit.ConfigError, match=r"unknown config key 'toy.shared'; did you mean 'toy.shared_std'"):
        load(None, ["--method", "toy", "--toy.shared", "2"])


def test_an_unregistered_method_is_gone_from_the_cli(capsys):
    from toy_method.method import ToyMethod

    peftkit.register_method(ToyMethod())
    assert "toy" in peftkit.available_methods()
    peftkit.unregister_method("toy")
    assert "toy" not in peftkit.available_methods()
    with pytest.raises(peftkit.ConfigError, match="method: 'toy' is not a training method"):
        load(None, ["--method", "toy"])
    assert main(["train", "--help"]) == 0
    assert "toy." not in capsys.readouterr().out


def test_export_and_import_hooks_are_paired_for_a_shared_tensor(toy, tmp_path, monkeypatch):
    model = peftkit.adapt(tiny_bert(), toy.config_cls(target_modules=["query", "value"]))
    randomize(model)
    model.eval()
    with torch.no_grad():
        expected = model(**BERT_X).logits
    model.save_adapter(tmp_path)
    torch.manual_seed(123)  # the reload draws other random shared matrices: only the file's values give `expected`
    loaded = peftkit.load_adapter(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BERT_X).logits, expected, atol=1e-6, rtol=1e-6)
    # without its import partner the shared tensor is a key the model does not have: refused, nothing left behind
    monkeypatch.setattr(type(toy), "import_tensors", lambda self, tensors, config, injection: tensors)
    plain = tiny_bert()
    with pytest.raises(peftkit.AdapterFileError, match=r"in the file but not in the model:\n\s+base_model\.model\.toy_shared"):
        peftkit.load_adapter(plain, tmp_path)
    assert adapter_layers(plain) == []


def test_register_method_wants_help_text_for_every_field():
    @dataclasses.dataclass(frozen=True)
    class Bare(peftkit.AdapterConfig):
        size: int = 3

    class BareMethod(peftkit.Method):
        name = "bare"
        config_cls = Bare

    with pytest.raises(ValueError, match=r"fields \['size'\] have no help text"):
        peftkit.register_method(BareMethod())
    assert "bare" not in peftkit.available_methods()


# ---------------------------------------------------------------------------------- recipe and entries
def test_the_cli_recipe_differs_from_the_library_defaults_as_stated_once():
    lora, ada = peftkit.LoraConfig(), peftkit.AdaLoraConfig(total_step=100)
    assert (lora.alpha, lora.dropout, lora.target_modules) == (8, 0.0, None)  # PEFT's defaults
    assert (ada.deltaT, ada.tinit, ada.tfinal) == (1, 0, 0)
    cli_lora = RunConfig.model_validate({"method": "lora"}).method_config()
    assert (cli_lora.alpha, cli_lora.dropout, cli_lora.target_modules) == (16, 0.1, "all-linear")
    assert cli_lora.r == lora.r  # a key outside the recipe keeps the library default
    cli_ada = RunConfig.model_validate({"method": "adalora"}).method_config({"total_steps": 100})
    assert (cli_ada.deltaT, cli_ada.tinit, cli_ada.tfinal, cli_ada.total_step) == (10, 10, 20, 100)
    for name in peftkit.available_methods():  # every recipe key is a setting of the method, stated differently
        method = peftkit.get_method(name)
        defaults = {f.name: f.default for f in dataclasses.fields(method.config_cls)}
        for key, value in method.recipe.items():
            assert key in defaults and defaults[key] != value, (name, key)


def test_dora_is_an_entry_whose_files_are_lora_files(tmp_path):
    with pytest.raises(peftkit.ConfigError, match="use_dora: false would train plain LoRA"):
        peftkit.DoraConfig(use_dora=False)
    with pytest.raises(peftkit.ConfigError, match="dora.use_dora: false would train plain LoRA"):
        load(None, ["--method", "dora", "--dora.use_dora", "false"])
    model = peftkit.adapt(tiny_bert(), peftkit.DoraConfig(r=4, target_modules=["query", "value"]))
    assert model.adapters["default"].method is peftkit.get_method("dora")
    randomize(model)
    model.eval()
    with torch.no_grad():
        expected = model(**BERT_X).logits
    model.save_adapter(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] is True
    loaded = peftkit.load_adapter(tiny_bert(), tmp_path).eval()
    record = loaded.adapters["default"]
    assert record.method is peftkit.get_method("lora") and record.config.use_dora is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BERT_X).logits, expected, atol=1e-6, rtol=1e-6)


def test_full_fine_tuning_is_an_entry_that_adapt_refuses():
    full = peftkit.get_method("full")
    assert full.adapter is False and full.peft_type is None and full.artifact == "model"
    base = tiny_bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(peftkit.ConfigError, match="full fine-tuning trains the model's own weights"):
        peftkit.adapt(base, peftkit.FullConfig())
    assert adapter_layers(base) == [] and base.state_dict().keys() == before.keys()
    assert all(p.requires_grad for p in base.parameters())  # the user's model is left as it was


# ------------------------------------------------------------------------------------------ public surface
def test_adapter_name_errors_are_typed():
    model = peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(peftkit.AdapterExistsError, match="already exists"):
        model.add_adapter(peftkit.LoraConfig(r=2, target_modules=["lin0"]), "default")
    for bad in ("lora_x", "bias_delta", "a.b", ""):
        with pytest.raises(peftkit.AdapterNameError) as caught:
            model.add_adapter(peftkit.LoraConfig(r=2, target_modules=["lin0"]), bad)
        assert not isinstance(caught.value, peftkit.AdapterExistsError)
    peftkit.check_adapter_name("other", model.adapters)  # a free, valid name passes
    assert issubclass(peftkit.AdapterExistsError, ValueError)


def test_a_method_reserves_its_names_while_registered(toy):
    with pytest.raises(peftkit.AdapterNameError, match="collides with the names"):
        peftkit.check_adapter_name("toy_scale", [])
    peftkit.unregister_method("toy")
    peftkit.check_adapter_name("toy_scale", [])


def test_delete_adapter_unwraps_the_layers_it_leaves_empty():
    base = tiny_bert()
    plain_keys = set(base.state_dict())
    model = peftkit.adapt(base, peftkit.LoraConfig(r=2, target_modules=["query"]))
    model.add_adapter(peftkit.LoraConfig(r=2, target_modules=["query", "value"]), "second")
    layers_of_both = adapter_layers(model.base_model)
    model.delete_adapter("second")
    left = adapter_layers(model.base_model)
    assert left and set(left) < set(layers_of_both)
    assert not any(path.endswith("value") for path in left)  # value held only "second": plain nn.Linear again
    assert all(type(model.base_model.get_submodule(p)) is nn.Linear for p in
               [p for p in layers_of_both if p.endswith("value")])
    model.delete_adapter("default")
    assert adapter_layers(model.base_model) == [] and set(model.base_model.state_dict()) == plain_keys


def test_count_parameters_and_method_states():
    mlp = MLP()
    total = sum(p.numel() for p in mlp.parameters())
    assert peftkit.count_parameters(mlp) == peftkit.TrainableParameters(total, total)
    model = peftkit.adapt(MLP(), peftkit.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["lin0"]))
    assert model.trainable_parameters() == peftkit.count_parameters(model)
    states = model.method_states()
    assert [name for name, _ in states] == ["default"] and hasattr(states[0][1], "state_dict")
    assert peftkit.adapt(MLP(), peftkit.LoraConfig(r=2, target_modules=["lin0"])).method_states() == []
