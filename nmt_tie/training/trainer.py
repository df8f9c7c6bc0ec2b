"""The training loop shared by translation and language models.

A *task* supplies the data and the loss; the `Trainer` owns everything else: devices and
mixed precision, DDP, the optimizer and schedule, gradient accumulation and clipping,
validation and early stopping, logs, progress, and checkpoints that make a run resume
exactly where it stopped (same weights as an uninterrupted run, on CPU with a fixed seed).

A task implements:
    model_config                       the resolved ModelConfig (written into checkpoints)
    build_model() -> nn.Module
    next_batch() -> batch              the next training batch, already on the device
    loss(model, batch) -> (loss_sum, nll_sum, tokens)   sums over the batch's tokens
    validate(model, run_dir) -> dict   metrics (must include "loss"; "bleu"/"chrf"/"ppl")
    epoch                              the epoch of the next batch (1-based)
    state_dict() / load_state_dict()   data-iterator (and other) state
    checkpoint_extras() -> dict        e.g. the vocabulary, stored in every checkpoint
    batch_tokens(batch) -> int         tokens, for per-token metrics
and optionally:
    loss_normalizer(batch) -> int      what the summed loss is divided by (default: tokens)
    extra_configs                      more config dataclasses to write into config.yaml
    decay_start                        for the epoch_decay schedule
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmt_tie.checkpoint import FORMAT, load_checkpoint, save_atomic
from nmt_tie.config import TrainConfig, dump_configs, to_dict
from nmt_tie.devices import autocast_context, resolve_device
from nmt_tie.errors import UserError
from nmt_tie.progress import progress_bar
from nmt_tie.training import distributed
from nmt_tie.training.metrics import MetricsLog
from nmt_tie.training.optim import LRSchedule, build_optimizer

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "loss": False, "ppl": False}


class TrainingDiverged(UserError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class LogWindow:
    """Sums over the updates since the last training log record."""

    loss: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    updates: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, nll: float, tokens: float) -> None:
        self.loss += loss
        self.nll += nll
        self.tokens += tokens
        self.updates += 1


class Trainer:
    def __init__(self, task_factory, model_cfg, train_cfg: TrainConfig, log=None):
        """`task_factory(model_cfg, train_cfg, dist_info, device)` builds the task."""
        self.cfg = train_cfg
        self.say = log or (lambda message: print(message, file=sys.stderr, flush=True))
        requested = resolve_device(train_cfg.device)
        self.dist = distributed.init_distributed(requested.type)
        if requested.type == "cuda" and self.dist.enabled:
            requested = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(requested)
        self.device = requested
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        if train_cfg.valid_metric not in HIGHER_IS_BETTER:
            raise UserError(f"valid_metric: {train_cfg.valid_metric!r} is not one of bleu, chrf, loss, ppl")
        self.autocast = autocast_context(self.device, train_cfg.dtype)
        self.run_dir = Path(train_cfg.save_dir)
        seed_everything(train_cfg.seed + self.dist.rank)

        self.task = task_factory(model_cfg, train_cfg, self.dist, self.device)
        self.model_cfg = self.task.model_config
        self.model: nn.Module = self.task.build_model().to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), train_cfg)
        self.schedule = LRSchedule(self.optimizer, train_cfg, getattr(self.task, "decay_start", 0))
        self.scaler = torch.amp.GradScaler("cuda") if train_cfg.dtype == "fp16" else None
        self.update = 0
        self.best: float | None = None
        self.bad_validations = 0
        self.elapsed_before = 0.0
        self.last_valid: dict = {}

        resume = self.run_dir / "last.pt"
        self._check_run_dir()
        if resume.exists():
            self._restore(load_checkpoint(resume, map_location=self.device))
            self.say(f"resuming {self.run_dir} from update {self.update} (epoch {self.task.epoch})")
        self.log = MetricsLog(self.run_dir, self.dist.is_main, self.update if resume.exists() else None)

        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if train_cfg.compile:
            self.train_model = torch.compile(self.train_model)

    # --- run directory and checkpoints -------------------------------------------------

    def _check_run_dir(self) -> None:
        config_file = self.run_dir / "config.yaml"
        resolved = dump_configs(self.model_cfg, self.cfg, *getattr(self.task, "extra_configs", ()))
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if config_file.exists() and (self.run_dir / "last.pt").exists():
                previous = yaml.safe_load(config_file.read_text())
                differs = [k for k, v in to_dict(self.model_cfg).items() if previous.get(k) != v]
                if differs:
                    raise UserError(
                        f"{self.run_dir} holds a run of another model ({', '.join(differs)} differ); "
                        "use another save_dir to start a new run"
                    )
            config_file.write_text(resolved)

    def _payload(self) -> dict:
        rng = distributed.gather_objects(rng_state(self.device), self.dist)
        return {
            "format": FORMAT,
            "model_config": to_dict(self.model_cfg),
            "train_config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "trainer": {
                "update": self.update,
                "best": self.best,
                "bad_validations": self.bad_validations,
                "elapsed": self.elapsed(),
                "last_valid": self.last_valid,
                "rng": rng,
            },
            "task": self.task.state_dict(),
            **self.task.checkpoint_extras(),
        }

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.schedule.load_state_dict(payload["schedule"])
        if self.scaler and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        state = payload["trainer"]
        self.update = state["update"]
        self.best = state["best"]
        self.bad_validations = state["bad_validations"]
        self.elapsed_before = state["elapsed"]
        self.last_valid = state["last_valid"]
        self.task.load_state_dict(payload["task"])
        ranks = state["rng"]
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank], self.device)
        else:
            self.say(
                f"the checkpoint was written by {len(ranks)} workers, this run has "
                f"{self.dist.world_size}: random state re-seeded"
            )
            seed_everything(self.cfg.seed + self.dist.rank + self.update)

    def save(self, improved: bool) -> None:
        payload = self._payload()  # every rank takes part (it gathers their random states)
        if not self.dist.is_main:
            return
        last = self.run_dir / "last.pt"
        save_atomic(payload, last)
        if improved:
            # best.pt is for translation and shipping: the model without optimizer state.
            training_state = ("optimizer", "schedule", "scaler", "task", "trainer")
            best = {key: value for key, value in payload.items() if key not in training_state}
            best["trainer"] = {"update": self.update, "best": self.best, "valid": self.last_valid}
            save_atomic(best, self.run_dir / "best.pt")
        if self.cfg.save_every and self.update % self.cfg.save_every == 0:
            _copy_atomic(last, self.run_dir / f"checkpoint_{self.update}.pt")
            numbered = sorted(self.run_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            for old in numbered[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                old.unlink()

    # --- the loop ------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _stop_reason(self) -> str | None:
        cfg = self.cfg
        if cfg.max_updates and self.update >= cfg.max_updates:
            return f"reached max_updates {cfg.max_updates}"
        if cfg.max_epochs and self.task.epoch > cfg.max_epochs:
            return f"reached max_epochs {cfg.max_epochs}"
        if cfg.max_time and self.elapsed() >= cfg.max_time * 60:
            return f"reached max_time {cfg.max_time} min"
        if cfg.patience and self.bad_validations >= cfg.patience:
            return f"no improvement in {cfg.patience} validations (patience)"
        return None

    def train_step(self) -> tuple[float, float, float, float | None]:
        """One update (update_freq batches); returns summed loss, nll, tokens, grad norm."""
        cfg = self.cfg
        self.train_model.train()
        self.schedule.set_epoch(self.task.epoch)
        self.schedule.set_update(self.update)
        batches = [self.task.next_batch() for _ in range(cfg.update_freq)]
        # The gradient is that of (summed loss of all workers) / (their summed normalizer).
        normalizer = getattr(self.task, "loss_normalizer", self.task.batch_tokens)
        total_norm = distributed.all_reduce_sum(
            float(sum(normalizer(b) for b in batches)), self.dist, self.device
        )
        penalty_weight = getattr(self.model_cfg, "projection_reg", 0.0)
        loss_sum = nll_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            no_sync = self.train_model.no_sync() if self.dist.enabled and not sync else nullcontext()
            with no_sync:
                with self.autocast:
                    loss, nll, _ = self.task.loss(self.train_model, batch)
                    objective = loss * (self.dist.world_size / total_norm)
                    if penalty_weight:
                        objective = objective + penalty_weight * self.model.projection_penalty() / len(
                            batches
                        )
                if self.scaler:
                    self.scaler.scale(objective).backward()
                else:
                    objective.backward()
            loss_sum += loss.item()
            nll_sum += nll.item()
        tokens = float(sum(self.task.batch_tokens(b) for b in batches))
        stats = torch.tensor([loss_sum, nll_sum, tokens], dtype=torch.float64)
        if self.dist.enabled:
            stats = stats.to(self.device)
            torch.distributed.all_reduce(stats)
        loss_sum, nll_sum, total_tokens = stats.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"training diverged at update {self.update + 1}: the loss is {loss_sum}; the last good "
                f"checkpoint is {self.run_dir / 'last.pt'}; lower lr, lengthen warmup or set clip_norm"
            )
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if cfg.clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1
        self.task.after_update()
        return loss_sum, nll_sum, total_tokens, grad_norm

    def validate(self) -> bool:
        """Validate on rank 0, share the result; return whether the metric improved."""
        result = None
        if self.dist.is_main:
            self.model.eval()
            with self.autocast, torch.no_grad():
                result = self.task.validate(self.model, self.run_dir)
            self.model.train()
        result = distributed.broadcast_object(result, self.dist)
        metric = result[self.cfg.valid_metric]
        better = HIGHER_IS_BETTER[self.cfg.valid_metric]
        improved = self.best is None or (metric > self.best if better else metric < self.best)
        if improved:
            self.best = metric
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        self.schedule.on_validation(improved)
        self.last_valid = {**result, "update": self.update}
        record = {
            "update": self.update,
            "epoch": self.task.epoch,
            **result,
            "best": self.best,
            "elapsed": round(self.elapsed(), 1),
        }
        self.log.write("valid", record)
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        self.say(f"update {self.update} valid: {shown}{' (best)' if improved else ''}")
        return improved

    def run(self) -> dict:
        cfg = self.cfg
        if not (cfg.max_updates or cfg.max_epochs or cfg.max_time or cfg.patience):
            raise UserError("set a stopping rule: max_updates, max_epochs, max_time or patience")
        self.started = time.perf_counter()
        bar = None
        if self.dist.is_main:
            bar = progress_bar("train", total=cfg.max_updates or None, unit="upd", initial=self.update)
        window = LogWindow()
        reason = self._stop_reason()
        try:
            while reason is None:
                epoch_before = self.task.epoch
                loss_sum, nll_sum, tokens, grad_norm = self.train_step()
                window.add(loss_sum, nll_sum, tokens)
                if bar is not None:
                    bar.update(1)
                if self.update % cfg.log_every == 0:
                    self._log_train(window, grad_norm, bar)
                    window = LogWindow()
                reason = self._stop_reason()
                epoch_ended = self.task.epoch != epoch_before
                due = self.update % cfg.valid_every == 0 if cfg.valid_every > 0 else epoch_ended
                if due or reason is not None:
                    improved = self.validate()
                    self.save(improved)
                    reason = self._stop_reason()
                for hook in getattr(self, "after_update_hooks", []):
                    hook(self)
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
        self.say(f"stopped after update {self.update}: {reason}; best {cfg.valid_metric} {self.best}")
        summary = {
            "update": self.update,
            "best": self.best,
            "reason": reason,
            "elapsed": self.elapsed(),
        }
        distributed.shutdown(self.dist)
        return summary

    def _log_train(self, window: LogWindow, grad_norm: float | None, bar) -> None:
        seconds = max(1e-9, time.perf_counter() - window.start)
        tokens = max(1.0, window.tokens)
        record = {
            "update": self.update,
            "epoch": self.task.epoch,
            "loss": round(window.loss / tokens, 4),
            "nll": round(window.nll / tokens, 4),
            "ppl": round(math.exp(min(50.0, window.nll / tokens)), 2),
            "lr": self.schedule.lr,
            "tokens_per_s": round(window.tokens / seconds, 1),
            "updates_per_s": round(window.updates / seconds, 3),
            "elapsed": round(self.elapsed(), 1),
        }
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm, 3)
        self.log.write("train", record)
        if bar is not None and not bar.disable:
            bar.set_postfix(loss=record["loss"], lr=f"{record['lr']:.2e}", tok_s=int(record["tokens_per_s"]))
        elif self.dist.is_main:
            self.say(
                f"update {self.update} epoch {record['epoch']} loss {record['loss']:.3f} "
                f"ppl {record['ppl']:.1f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
            )


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
