"""The training loop of ``peftkit train``: one process, or several under torchrun (DDP or FSDP2).

AdamW; linear warm-up then linear/cosine/constant; gradient accumulation; clipping; bf16 autocast; non-reentrant
gradient checkpointing; evaluation every N steps or each epoch; early stopping; the best model kept; atomic,
resumable checkpoints (model, optimizer, scheduler, RNG and position in the data order). A step with a non-finite
loss or gradient norm is skipped; after ``max_skipped_steps`` of them the run stops as diverged (``guards.py``).

Losses are normalised by the number of examples of the optimizer step: every process's share of every batch
accumulated into it (fewer at the end of an epoch), so that the gradient, the logged loss and the gradient norm
are those of one batch of the same examples, with one process or N.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from .. import data as D
from ..model import count_parameters
from ..io import atomic_write, output_error, recover_dir, write_dir, write_json
from . import checkpoint as C
from . import distributed as dist
from ..config import ConfigError
from .config import RunConfig
from .guards import StepGuard, TrainingDiverged, check_savable
from .methods import get as get_method
from .metrics import TensorBoard, plot_confusion, plot_history, scores
# re-exported: run.py and peftkit.serve import these from here
from .setup import build_model, load_datasets, resolve_data, resolve_model, schedule  # noqa: F401

LABELS_FILE = "labels.json"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"


# ------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False) -> None:
        self.config = resolve_data(config)
        self.resume = resume
        self.run_dir = Path(self.config.output_dir)
        self.env = dist.environment()

    # -- entry point ---------------------------------------------------------------------------------
    def train(self) -> dict:
        config = self.config
        model_path = resolve_model(config.model)
        datasets = load_datasets(config)  # every input problem surfaces here, before the run folder exists
        self._check_run_folder()
        self._make_run_folder()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        from ..ops.memory import keep_freed_memory

        keep_freed_memory()
        dist.init(self.env)
        self._seed(config.seed)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.datasets = datasets
        self.features = {name: D.encode(self.tokenizer, getattr(datasets, name), config.max_length)
                         for name in ("train", "dev", "test")}
        self.targets = {name: datasets.labels.ids(getattr(datasets, name), name) for name in ("train", "dev", "test")}
        self.method = get_method(config.method)
        self.batches_per_epoch = math.ceil(len(datasets.train) / (config.batch_size * self.env.world))
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.model = build_model(config, model_path, datasets.labels, run_info={"total_steps": self.total_steps})
        self.wrapped = dist.wrap(self.model, self.env, config.distributed)
        # after wrapping: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.named_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.peak_learning_rate, weight_decay=config.weight_decay)
        self.method_store: dict = {}  # e.g. cached features of head-only training
        self.distiller = None
        if config.distill is not None:
            from .distill import Distiller

            self.distiller = Distiller(config.distill, self.model, datasets.labels)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(config, self.total_steps))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_step": None, "bad_evals": 0,
                      "skipped_steps": 0, "history": []}
        if self.resume:
            self._restore()
        self.guard = StepGuard(config.max_skipped_steps, self.state, self._advice(), say=self.env.main)
        if self.env.main:
            atomic_write(self.run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config.to_yaml(), encoding="utf-8"))
            write_json(self.run_dir / LABELS_FILE, datasets.labels.to_dict())
        self.board = TensorBoard(self.run_dir / "tensorboard", enabled=self.env.main)
        self.model.train()  # from_pretrained returns models in eval mode: dropout would be off
        try:
            self._loop()
            report = self._finish()
        finally:
            self.board.close()
            dist.shutdown(self.env)
        return report

    def _make_run_folder(self) -> None:
        """Create the run folder up front (an unwritable place fails here, before any work), and finish any
        folder swap that a crash interrupted (see ``io.write_dir``)."""
        if not self.env.main:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(err, self.run_dir) from None
        for name in ("best", "adapter", "model"):
            recover_dir(self.run_dir / name)

    def _advice(self) -> str:
        best = self.run_dir / "best"
        return (f"Nothing was saved from the diverged model (an earlier best, if any, stays in {best}). Lower the "
                f"learning rate (now {self.config.peak_learning_rate:g}), keep max_grad_norm set, or use a longer "
                "warm-up (warmup_ratio).")

    def _check_run_folder(self) -> None:
        existing = self.run_dir / CONFIG_FILE
        if existing.exists() and not self.resume:
            if C.complete(self.run_dir / "checkpoints") or (self.run_dir / REPORT_FILE).exists():
                raise FileExistsError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it, or choose another --output_dir"
                )

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        config, state = self.config, self.state
        lengths = [len(f["input_ids"]) for f in self.features["train"]]
        progress = self._progress()
        window_loss, window_examples, started = 0.0, 0, time.perf_counter()
        accumulated = 0
        while state["step"] < self.total_steps:
            order = D.length_batches(lengths, config.batch_size * self.env.world, seed=config.seed + state["epoch"])
            while state["batch"] < len(order) and state["step"] < self.total_steps:
                if accumulated == 0:  # the window of this optimizer step (shorter at the end of an epoch)
                    window = order[state["batch"]:state["batch"] + config.gradient_accumulation_steps]
                    window_size = sum(len(b) for b in window)
                global_batch = order[state["batch"]]
                state["batch"] += 1
                accumulated += 1
                last_micro = accumulated == len(window)
                loss_sum = self._micro_step(global_batch, sync=last_micro, examples=window_size, parts=len(window))
                window_loss += loss_sum
                window_examples += len(global_batch)
                if not last_micro:
                    continue
                accumulated = 0
                grad_norm = self._optimizer_step(window_loss / window_examples)
                state["step"] += 1
                lr = self.scheduler.get_last_lr()[0]
                mean_loss = window_loss / max(1, window_examples)
                speed = window_examples / max(1e-9, time.perf_counter() - started)
                record = {"step": state["step"], "epoch": state["epoch"] + state["batch"] / len(order),
                          "train_loss": mean_loss, "grad_norm": grad_norm, "learning_rate": lr}
                state["history"].append(record)
                self.board.scalars({"train/loss": mean_loss, "train/grad_norm": grad_norm, "train/learning_rate": lr,
                                    "train/examples_per_second": speed}, state["step"])
                progress(mean_loss, lr, speed)
                window_loss, window_examples, started = 0.0, 0, time.perf_counter()
                if self._evaluate_now(end_of_epoch=state["batch"] == len(order)):
                    if self._evaluate_and_keep_best():
                        break  # early stopping
                elif config.save_steps and state["step"] % config.save_steps == 0:
                    self._checkpoint()
            else:
                state["epoch"] += 1
                state["batch"] = 0
                continue
            break
        progress(None, None, None)

    def _micro_step(self, indices: list[int], sync: bool, examples: int, parts: int) -> float:
        """Forward/backward of this process's share of a global batch; returns the global sum of losses.

        ``examples``: the global number of examples in this optimizer step's window of ``parts`` batches."""
        mine = indices[self.env.rank::self.env.world]
        batch = D.collate(self.tokenizer, [self.features["train"][i] for i in mine])
        labels = torch.tensor([self.targets["train"][i] for i in mine])
        context = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else contextlib.nullcontext()
        with context, self._autocast():
            if self.method.logits is not None:
                logits = self.method.logits(self.wrapped, batch, [("train", i) for i in mine], self.config, self.method_store)
                losses = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            elif self.distiller is not None:
                out = self.wrapped(**batch, output_hidden_states=self.distiller.needs_hidden)
                losses = self.distiller.loss_sum(out, batch, labels)
            else:
                losses = nn.functional.cross_entropy(self.wrapped(**batch).logits.float(), labels, reduction="sum")
            # ∑ over my examples / examples in the window, times world (DDP averages gradients over processes)
            loss = losses * self.env.world / examples
            extra = self.model.regularization() if hasattr(self.model, "regularization") else None
            if extra is not None:  # e.g. AdaLoRA's orthogonality penalty, once per optimizer step
                loss = loss + extra / parts
        loss.backward()
        return dist.sum_scalar(losses.detach(), self.env)

    def _optimizer_step(self, loss: float) -> float:
        """Clip and apply the gradients, unless the loss or the gradient norm is non-finite: then the step is
        skipped (the guard stops the run after max_skipped_steps such steps). Same decision on every process:
        loss and gradients are already reduced over them."""
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in self.params if p.grad is not None]))
        norm = float(dist.full(norm))
        if StepGuard.finite(loss, norm):
            self.optimizer.step()
            if hasattr(self.model, "after_optimizer_step"):  # e.g. AdaLoRA's rank budget (needs the gradients)
                self.model.after_optimizer_step(self.state["step"])
        else:
            self.guard.skip(self.state["step"] + 1, loss, norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.config.bf16 else contextlib.nullcontext()

    def _evaluate_now(self, end_of_epoch: bool) -> bool:
        strategy = self.config.eval_strategy
        if strategy == "steps":
            return self.state["step"] % self.config.eval_steps == 0 or self.state["step"] == self.total_steps
        if strategy == "epoch":
            return end_of_epoch or self.state["step"] == self.total_steps
        return self.state["step"] == self.total_steps

    # -- evaluation -----------------------------------------------------------------------------------
    def predict(self, split: str) -> tuple[torch.Tensor, list[int]]:
        """Logits of a split (rows in file order) and the true label ids."""
        features = self.features[split]
        self.model.eval()
        outputs = []
        lengths = [len(f["input_ids"]) for f in features]
        order = sorted(range(len(features)), key=lambda i: lengths[i])
        with torch.no_grad(), self._autocast():
            for start in range(0, len(order), self.config.eval_batch_size):
                idx = order[start:start + self.config.eval_batch_size]
                outputs.append((idx, self.model(**D.collate(self.tokenizer, [features[i] for i in idx])).logits.float()))
        self.model.train()
        logits = torch.empty(len(features), len(self.datasets.labels))
        for idx, out in outputs:
            logits[idx] = out
        return logits, self.targets[split]

    def evaluate(self, split: str) -> dict:
        logits, targets = self.predict(split)
        loss = float(nn.functional.cross_entropy(logits, torch.tensor(targets))) if targets else float("nan")
        result = scores(targets, logits.argmax(-1).tolist(), self.datasets.labels.names)
        result["loss"] = loss
        return result

    @property
    def sharded(self) -> bool:
        return self.env.distributed and self.config.distributed == "fsdp"

    def _evaluate_and_keep_best(self) -> bool:
        """Evaluate on dev, keep the best model, checkpoint; True when early stopping triggers.

        Only the main process evaluates, except under FSDP, where every process takes part in the forward."""
        config, state = self.config, self.state
        stop = better = diverged = False
        result = self.evaluate("dev") if self.datasets.dev and (self.env.main or self.sharded) else None
        if self.env.main and result is not None:
            metric = result["loss"] if config.metric_for_best_model == "loss" else result[config.metric_for_best_model]
            diverged = not math.isfinite(result["loss"])  # a model with a NaN dev loss is never the best
            better = not diverged and (state["best"] is None or (
                metric < state["best"] if config.metric_for_best_model == "loss" else metric > state["best"]))
            record = {"step": state["step"], "dev_loss": result["loss"], "dev_accuracy": result["accuracy"],
                      "dev_macro_f1": result["macro_f1"]}
            state["history"].append(record)
            self.board.scalars({"dev/loss": result["loss"], "dev/accuracy": result["accuracy"],
                                "dev/macro_f1": result["macro_f1"]}, state["step"])
            if better:
                state["best"], state["best_step"], state["bad_evals"] = metric, state["step"], 0
            else:
                state["bad_evals"] += 1
                stop = bool(config.early_stopping_patience and state["bad_evals"] >= config.early_stopping_patience)
            self._say(f"step {state['step']}: dev loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, "
                      f"macro-F1 {result['macro_f1']:.4f}" + (" (best)" if better else ""))
        if dist.broadcast_flag(diverged, self.env):
            raise TrainingDiverged(f"training diverged at step {state['step']}: the dev loss is not finite. "
                                   + self._advice())
        if dist.broadcast_flag(better, self.env):
            self._save_model(self.run_dir / "best")
        self._checkpoint()
        return dist.broadcast_flag(stop, self.env)

    # -- saving -----------------------------------------------------------------------------------------
    def _save_model(self, directory: Path) -> None:
        """The method's artifact (e.g. the adapter), written whole into a new folder, then swapped in."""
        with dist.gather_for_save(self.model, self.env, self.config.distributed):
            if not self.env.main:
                return
            check_savable(self._trainable_tensors(), "model", self._advice())
            write_dir(directory, lambda tmp: self.method.save(self.model, tmp))

    def _trainable_tensors(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _checkpoint(self) -> None:
        with dist.gather_for_save(self.model, self.env, self.config.distributed):
            opt_tensors, opt_plain = C.optimizer_state(self.optimizer)
            # whole optimizer moments: under FSDP2 they are shards, and gathering them is a collective on every rank
            opt_tensors = {key: dist.full(value) for key, value in opt_tensors.items()}
            if not self.env.main:
                return
            check_savable(self._trainable_tensors(), "checkpoint", self._advice())
            tensors = {f"param.{n}": p.detach().clone() for n, p in self._trainable_tensors()}
        rng_tensors, rng_plain = C.rng_state()
        method_plain = {}
        for name, state in self._method_states():
            method_tensors, method_plain[name] = state.state_dict()
            tensors.update({f"method.{name}.{key}": value for key, value in method_tensors.items()})
        state = dict(self.state, optimizer=opt_plain, scheduler=self.scheduler.state_dict(), rng=rng_plain,
                     world=self.env.world, methods=method_plain)
        state["scheduler"].pop("lr_lambdas", None)
        C.save(self.run_dir / "checkpoints", self.state["step"], {**tensors, **opt_tensors, **rng_tensors}, state,
               keep=self.config.keep_checkpoints)

    def _method_states(self):
        """(adapter name, resumable method state) pairs, e.g. AdaLoRA's rank allocator."""
        return self.model.method_states() if hasattr(self.model, "method_states") else []

    def _restore(self) -> None:
        found = C.complete(self.run_dir / "checkpoints")
        if not found:
            raise FileNotFoundError(f"{self.run_dir}: no checkpoint to resume from")
        tensors, state = C.load(found[-1])
        if state.get("world", 1) != self.env.world:
            raise ConfigError(f"{found[-1]}: the checkpoint was written by {state.get('world')} process(es), this run "
                                f"has {self.env.world}; resume with the same number of processes")
        with torch.no_grad():
            for name, param in self.named_params.items():
                param.copy_(tensors[f"param.{name}"])
        C.restore_optimizer(self.optimizer, tensors, state.pop("optimizer"))
        scheduler_state = state.pop("scheduler")
        self.scheduler.load_state_dict({**scheduler_state, "lr_lambdas": [None]})
        C.restore_rng(tensors, state.pop("rng"))
        method_plain = state.pop("methods", {})
        for name, method_state in self._method_states():
            prefix = f"method.{name}."
            method_state.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                         method_plain.get(name, {}))
        state.pop("world", None)
        self.state.update(state)
        self._say(f"resumed from {found[-1].name} (step {self.state['step']}, epoch {self.state['epoch']})")

    # -- the end ----------------------------------------------------------------------------------------
    def _finish(self) -> dict:
        config = self.config
        best_dir = self.run_dir / "best"
        share = _trainable(self.model)  # of the model as trained (the reloaded one below is frozen)
        if self.sharded:  # under FSDP the final weights are the result (reloading the best would need a re-shard)
            self._save_model(best_dir)
        elif self.env.main and best_dir.exists():
            self._load_best(best_dir)
        report = {}
        results = {split: self.evaluate(split) for split in ("dev", "test")
                   if getattr(self.datasets, split) and (self.env.main or self.sharded)}
        if self.env.main:
            report = {"method": config.method, "model": config.model, "labels": self.datasets.labels.names,
                      "trainable_parameters": share[0], "total_parameters": share[1], "trainable_share": share[2],
                      "steps": self.state["step"], "best_step": self.state["best_step"],
                      "skipped_steps": self.state["skipped_steps"],
                      "metric_for_best_model": config.metric_for_best_model}
            report.update(results)
            self._write_outputs(report)
        dist.barrier(self.env)
        return report

    def _load_best(self, best_dir: Path) -> None:
        """Evaluate what was saved: the best artifact reloaded into a fresh base model through the method's own
        (strict) loader, exactly as ``peftkit eval`` will see it."""
        fresh = build_model(self.config, resolve_model(self.config.model), self.datasets.labels, prepare=False)
        self.model = self.method.load(fresh, best_dir).eval()

    def _write_outputs(self, report: dict) -> None:
        run = self.run_dir
        for name in ("adapter", "model"):
            source = run / "best" / name
            if source.exists():
                write_dir(run / name, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
        if not (run / "best").exists():  # no dev set: the final weights are the result
            self._save_model(run / "best")
            self._write_outputs(report)
            return
        plots = run / "plots"
        plot_history(self.state["history"], plots)
        for split in ("dev", "test"):
            if split in report:
                plot_confusion(report[split]["confusion_matrix"], self.datasets.labels.names,
                               plots / f"confusion_{split}.png", f"confusion matrix ({split})")
        report["history"] = self.state["history"]
        write_json(run / REPORT_FILE, report)
        for split in ("dev", "test"):
            if split in report:
                self._say(f"\n{split} set ({len(getattr(self.datasets, split))} examples):\n{report[split]['report_text']}"
                          f"\naccuracy {report[split]['accuracy']:.4f}   macro-F1 {report[split]['macro_f1']:.4f}")
        self._say(f"trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
                  f"({100 * report['trainable_share']:.3f}%)\nrun folder: {run}")

    # -- output ----------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.env.main:
            print(text, flush=True)

    def _progress(self):
        if not self.env.main or self.config.quiet:
            return lambda *args: None
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state["step"], desc="training", unit="step", dynamic_ncols=True)

        def update(loss, lr, speed):
            if loss is None:
                bar.close()
                return
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_per_s=f"{speed:.0f}")

        return update


def _trainable(model: nn.Module) -> tuple[int, int, float]:
    counted = count_parameters(model)
    return counted.trainable, counted.total, counted.share


def train(config: RunConfig, resume: bool = False) -> dict:
    return Trainer(config, resume).train()
