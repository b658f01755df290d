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
import time
from pathlib import Path

import torch
from torch import nn

from ..tasks import task_of
from ..tasks.data import length_batches
from . import checkpoint as C
from . import distributed as dist
from ..model import count_parameters
from .config import RunConfig
from .evaluation import evaluate_and_keep_best
from .folder import RunFolder, load_trained, no_grad_forward
from .guards import StepGuard, check_savable
from ..methods import get_method
from .metrics import plot_history
from .tracking import Trackers
from .setup import build_model, load_datasets, resolve_data, resolve_model, schedule


# ------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False) -> None:
        self.config = resolve_data(config)
        self.resume = resume
        self.folder = RunFolder(self.config.output_dir)
        self.run_dir = self.folder.path
        self.task = task_of(self.config)
        self.env = dist.environment()

    # -- entry point ---------------------------------------------------------------------------------
    def train(self) -> dict:
        config = self.config
        model_path = resolve_model(config.model)
        datasets = load_datasets(config, self.task)  # every input problem surfaces here, before the run folder exists
        self._check_run_folder()
        if self.env.main:
            self.folder.create()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        from ..ops.memory import keep_freed_memory

        keep_freed_memory()
        dist.init(self.env)
        self._seed(config.seed)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.datasets = datasets
        self.features = {name: self.task.encode(self.tokenizer, getattr(datasets, name), config.max_length)
                         for name in ("train", "dev", "test")}
        self.targets = {name: self.task.targets(getattr(datasets, name), datasets.vocabulary, name)
                        for name in ("train", "dev", "test")}
        self.method = get_method(config.method)
        self.batches_per_epoch = math.ceil(len(datasets.train) / (config.batch_size * self.env.world))
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.model = build_model(config, model_path, self.task, datasets.vocabulary,
                                 run_info={"total_steps": self.total_steps})
        self.method_config = config.method_config({"total_steps": self.total_steps})
        self.wrapped = dist.wrap(self.model, self.env, config.distributed)
        # after wrapping: FSDP2 replaces the parameters by sharded ones, which the optimizer must hold
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.named_params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.peak_learning_rate, weight_decay=config.weight_decay)
        self.method_store: dict = {}  # e.g. cached features of head-only training
        self.distiller = None
        if config.distill is not None:
            from .distill import Distiller

            self.distiller = Distiller(config.distill, self.model, self.task, datasets.vocabulary)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(config, self.total_steps))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_step": None, "bad_evals": 0,
                      "skipped_steps": 0, "history": []}
        if self.resume:
            self._restore()
        self.guard = StepGuard(config.max_skipped_steps, self.state, self._advice(), say=self.env.main)
        if self.env.main:
            self.folder.write_config(config)
            self.folder.write_vocabulary(self.task, datasets.vocabulary)
        self.board = Trackers(config, self.folder, lambda: self.state["history"], self.total_steps, enabled=self.env.main)
        self.model.train()  # from_pretrained returns models in eval mode: dropout would be off
        try:
            self._loop()
            report = self._finish()
            self.board.finish(report)
        finally:
            self.board.close()
            dist.shutdown(self.env)
        return report

    def _advice(self) -> str:
        best = self.folder.best_dir
        return (f"Nothing was saved from the diverged model (an earlier best, if any, stays in {best}). Lower the "
                f"learning rate (now {self.config.peak_learning_rate:g}), keep max_grad_norm set, or use a longer "
                "warm-up (warmup_ratio).")

    def _check_run_folder(self) -> None:
        if not self.resume and self.folder.holds_finished_or_resumable_run():
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
            order = length_batches(lengths, config.batch_size * self.env.world, seed=config.seed + state["epoch"])
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
        batch = self.task.collate(self.tokenizer, [self.features["train"][i] for i in mine])
        targets = [self.targets["train"][i] for i in mine]
        context = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) else contextlib.nullcontext()
        with context, self._autocast():
            if self.method.train_logits is not None and self.task.pooled_head:  # e.g. head-only on cached features
                logits = self.method.train_logits(self.wrapped, batch, [("train", i) for i in mine],
                                                  self.method_config, self.method_store)
                losses = self.task.loss_sum(logits, targets)
            elif self.distiller is not None:
                out = self.task.forward(self.wrapped, batch, output_hidden_states=self.distiller.needs_hidden)
                losses = self.distiller.loss_sum(out, batch, self.task.loss_sum(self.task.logits(out), targets))
            else:
                losses = self.task.loss_sum(self.task.logits(self.task.forward(self.wrapped, batch)), targets)
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
    def predict(self, split: str) -> tuple[torch.Tensor, list]:
        """Logits of a split (rows in file order) and its targets."""
        self.model.eval()
        logits = no_grad_forward(self.task, self.model, self.tokenizer, self.features[split],
                                 self.config.eval_batch_size, self._autocast())
        self.model.train()
        return logits, self.targets[split]

    def _logits_of(self, examples: list) -> torch.Tensor:
        """Logits of examples outside the splits (e.g. a calibration file), rows in order."""
        self.model.eval()
        features = self.task.encode(self.tokenizer, examples, self.config.max_length)
        logits = no_grad_forward(self.task, self.model, self.tokenizer, features, self.config.eval_batch_size,
                                 self._autocast())
        self.model.train()
        return logits

    def evaluate(self, split: str) -> dict:
        logits, targets = self.predict(split)
        return self.task.metrics(logits, targets, self.datasets.vocabulary)

    @property
    def sharded(self) -> bool:
        return self.env.distributed and self.config.distributed == "fsdp"

    def _evaluate_and_keep_best(self) -> bool:
        return evaluate_and_keep_best(self)

    # -- saving -----------------------------------------------------------------------------------------
    def _save_model(self, directory: Path) -> None:
        """The method's artifact (e.g. the adapter), written whole into a new folder, then swapped in."""
        with dist.gather_for_save(self.model, self.env, self.config.distributed):
            if not self.env.main:
                return
            check_savable(self._trainable_tensors(), "model", self._advice())
            self.folder.save_model(self.method, self.model, directory)

    def _trainable_tensors(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def _checkpoint(self) -> None:
        C.save_training(self)

    def _restore(self) -> None:
        C.restore_training(self)

    # -- the end ----------------------------------------------------------------------------------------
    def _finish(self) -> dict:
        config = self.config
        best_dir = self.folder.best_dir
        counted = count_parameters(self.model)  # of the model as trained (the reloaded one below is frozen)
        if self.sharded:  # under FSDP the final weights are the result (reloading the best would need a re-shard)
            self._save_model(best_dir)
        elif self.env.main and best_dir.exists():
            self._load_best(best_dir)
        report = {}
        # settings fitted with the best model before it is evaluated (classification: the out-of-scope threshold)
        calibration = self.task.calibrate(self._logits_of, self.datasets, config) \
            if self.env.main or self.sharded else {}
        results = {split: self.evaluate(split) for split in ("dev", "test")
                   if getattr(self.datasets, split) and (self.env.main or self.sharded)}
        if self.env.main:
            if calibration:
                self.folder.write_vocabulary(self.task, self.datasets.vocabulary)
                self._say("calibrated: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                                     for key, value in calibration.items()))
            report = {"method": config.method, "model": config.model,
                      "labels": self.task.names(self.datasets.vocabulary),
                      "trainable_parameters": counted.trainable, "total_parameters": counted.total,
                      "trainable_share": counted.share,
                      "steps": self.state["step"], "best_step": self.state["best_step"],
                      "skipped_steps": self.state["skipped_steps"],
                      "metric_for_best_model": config.metric_for_best_model}
            report.update(results)
            if calibration:
                report["calibration"] = calibration
            report.update(self.task.final_evaluation(self.model, self.tokenizer, self.datasets, config, self._say))
            self._write_outputs(report)
        dist.barrier(self.env)
        return report

    def _load_best(self, best_dir: Path) -> None:
        """Evaluate what was saved: the best artifact reloaded into a fresh base model through the method's own
        (strict) loader, exactly as ``peftkit eval`` will see it."""
        self.model = load_trained(self.config, self.task, self.datasets.vocabulary, best_dir)

    def _write_outputs(self, report: dict) -> None:
        folder = self.folder
        folder.publish_best()
        if not folder.best_dir.exists():  # no dev set: the final weights are the result
            self._save_model(folder.best_dir)
            self._write_outputs(report)
            return
        plot_history(self.state["history"], folder.plots_dir, self.task.curve_metrics)
        self.task.plots(report, self.datasets.vocabulary, folder.plots_dir)
        report["history"] = self.state["history"]
        folder.write_report(report)
        for split in ("dev", "test"):
            if split in report:
                self._say(f"\n{split} set ({len(getattr(self.datasets, split))} examples):\n{report[split]['report_text']}"
                          f"\n{self.task.summary(report[split])}")
        self._say(f"trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
                  f"({100 * report['trainable_share']:.3f}%)\nrun folder: {folder.path}")

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


def train(config: RunConfig, resume: bool = False) -> dict:
    return Trainer(config, resume).train()
