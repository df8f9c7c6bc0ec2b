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
    data_identity() -> dict            what a resumed run must train on (vocabulary, data)
    batch_tokens(batch) -> int         tokens, for per-token metrics
and optionally:
    loss_normalizer(batch) -> int      what the summed loss is divided by (default: tokens)
    extra_configs                      more config dataclasses to write into config.yaml
    decay_start                        for the epoch_decay schedule
"""

from __future__ import annotations

import math
import random
import signal
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
from nmt_tie.devices import (
    HeapTrimmer,
    autocast_context,
    compiled_graph_count,
    describe_precision,
    effective_dtype,
    keep_large_tensors_in_heap,
    resolve_device,
    set_tf32,
)
from nmt_tie.errors import UserError
from nmt_tie.model.transformer import set_cpu_bf16_attention
from nmt_tie.progress import progress_bar
from nmt_tie.training import distributed
from nmt_tie.training.metrics import MetricsLog
from nmt_tie.training.optim import LRSchedule, build_optimizer
from nmt_tie.training.preemption import StopSignals, TrainingStopped, ValidationInterrupted
from nmt_tie.training.runlock import RunDirLock

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "loss": False, "ppl": False}
# On a CPU, resident memory is checked this often; free heap pages go back to the system
# when it has grown (HeapTrimmer) and after every validation.
RELEASE_MEMORY_EVERY = 10


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
    # The generators take CPU byte tensors only (a checkpoint loaded onto a GPU would fail here).
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


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
        self.dist, self.device = distributed.init_distributed(resolve_device(train_cfg.device))
        if not self.dist.is_main:  # rank 0 speaks for all
            self.say = lambda message: None
        if train_cfg.threads > 0:
            torch.set_num_threads(train_cfg.threads)
        keep_large_tensors_in_heap(self.device)
        if train_cfg.valid_metric not in HIGHER_IS_BETTER:
            raise UserError(f"valid_metric: {train_cfg.valid_metric!r} is not one of bleu, chrf, loss, ppl")
        self.precision = effective_dtype(self.device, train_cfg.dtype)
        self.valid_precision = effective_dtype(self.device, train_cfg.valid_dtype)
        set_tf32(self.device, train_cfg.tf32)
        set_cpu_bf16_attention(train_cfg.cpu_attention)
        self.autocast = autocast_context(self.device, self.precision)
        self.run_dir = Path(train_cfg.save_dir)
        seed_everything(train_cfg.seed + self.dist.rank)

        self.task = task_factory(model_cfg, train_cfg, self.dist, self.device)
        self.model_cfg = self.task.model_config
        # How an update's batch is made (batch_plan.py); tasks without a plan accumulate update_freq.
        plan = getattr(self.task, "batch_plan", None)
        if plan is None and (train_cfg.global_batch_tokens or train_cfg.global_batch_sentences):
            raise UserError("global_batch_tokens and global_batch_sentences are for translation models")
        self.update_freq = plan.update_freq if plan is not None else train_cfg.update_freq
        self.model: nn.Module = self.task.build_model().to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), train_cfg)
        self.schedule = LRSchedule(self.optimizer, train_cfg, getattr(self.task, "decay_start", 0))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.update = 0
        self.best: float | None = None
        self.bad_validations = 0
        self.elapsed_before = 0.0
        self.last_valid: dict = {}
        self.started = time.perf_counter()
        self.last_save = self.started
        # Decisions taken by the clock are rank 0's, shared through the per-update statistics:
        # ranks that each read their own clock could stop one update apart and then wait for
        # each other in different collectives until the NCCL watchdog kills the job.
        self.time_up = False
        self.save_due = False
        # A stop signal on any rank, shared the same way (see preemption.py).
        self.signals = StopSignals()
        self.stop_requested = False
        # A validation that a stop signal interrupted: the resumed run does it first.
        self.validation_pending = False

        self.lock = RunDirLock(self.run_dir)
        try:
            payload = self._open_run_dir()
            if payload is not None:
                self._restore(payload)
                self.say(f"resuming {self.run_dir} from update {self.update} (epoch {self.task.epoch})")
        except BaseException:
            self.lock.release()
            raise
        resumed = payload is not None
        self.log = MetricsLog(self.run_dir, self.dist.is_main, self.update if resumed else None)
        precision = describe_precision(self.device, train_cfg.dtype, self.precision, train_cfg.tf32)
        self.say(f"{precision}; validation in {self.valid_precision}")
        for line in [*plan.notes, plan.describe()] if plan is not None else []:
            self.say(line)
        self.log.write(
            "setup",
            {
                "update": self.update,
                "device": str(self.device),
                "workers": self.dist.world_size,
                "dtype": self.precision,
                "valid_dtype": self.valid_precision,
                "tf32": bool(train_cfg.tf32 and self.device.type == "cuda" and self.precision == "fp32"),
                **(plan.record() if plan is not None else {"update_freq": self.update_freq}),
            },
        )

        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if train_cfg.compile:
            if getattr(self.model_cfg, "arch", None) == "rnn":
                self.say(
                    "compile: the RNN's time loop unrolls, so every new sentence length compiles "
                    "again (about 5 minutes each on a 2-core CPU); leave compile off for RNNs"
                )
            if self.device.type == "cpu":
                self.say(
                    "compile: on a 2-core CPU, compiled training measured 0.58x eager in bf16 and "
                    "0.70x in fp32 (README, Speed); it pays on GPUs (1.4x)"
                )
            self.train_model = torch.compile(self.train_model)

    # --- run directory and checkpoints -------------------------------------------------

    def _open_run_dir(self) -> dict | None:
        """Rank 0 locks the run directory, checks it and reads `last.pt` (on the CPU); every
        rank gets rank 0's checkpoint (or error), so that nodes without shared storage resume
        from the same state instead of silently starting from zero."""
        payload = error = None
        if self.dist.is_main:
            try:
                self.lock.acquire()
                self._check_run_dir()
                resume = self.run_dir / "last.pt"
                # On the CPU: the random states must stay CPU tensors, and Adam's step counts
                # too (on a GPU they would make every optimizer step synchronize);
                # load_state_dict moves each tensor where its parameter lives.
                payload = load_checkpoint(resume, map_location="cpu") if resume.exists() else None
            except UserError as err:
                error = str(err)
        if self.dist.enabled:
            payload, error = distributed.broadcast_object((payload, error), self.dist)
        if error is not None:
            raise UserError(error if self.dist.is_main else f"rank 0 stopped: {error}")
        return payload

    def _check_run_dir(self) -> None:
        config_file = self.run_dir / "config.yaml"
        resolved = dump_configs(self.model_cfg, self.cfg, *getattr(self.task, "extra_configs", ()))
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
        # Left by a process killed while saving (SIGKILL after a scheduler's grace period):
        # no other process writes here while this one holds the lock.
        for leftover in self.run_dir.glob(".*.pt.tmp-*"):  # checkpoint.temporary_path's names
            leftover.unlink(missing_ok=True)

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
                "validation_pending": self.validation_pending,
                "rng": rng,
            },
            "task": self.task.state_dict(),
            "data": self.task.data_identity(),
            **self.task.checkpoint_extras(),
        }

    def _restore(self, payload: dict) -> None:
        saved = payload.get("data")  # none in checkpoints before 2026-11-30
        current = self.task.data_identity()
        if saved is not None and (differs := [what for what in saved if saved[what] != current.get(what)]):
            # the same model shape on another vocabulary would train on silently, its ids
            # meaning other pieces
            raise UserError(
                f"{self.run_dir / 'last.pt'} was trained on other data: its {' and '.join(differs)} "
                "differ from this run's; resume with the data it was trained on, or use another save_dir"
            )
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
        self.validation_pending = state.get("validation_pending", False)
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
        self.last_save = time.perf_counter()
        if not self.dist.is_main:
            return
        save_atomic(payload, self.run_dir / "last.pt")
        # best.pt and the numbered checkpoints are for translation, averaging and shipping:
        # the model without the optimizer state (a third of the size with Adam).
        weights = self._weights_only(payload)
        if improved:
            best = {**weights, "trainer": {**weights["trainer"], "best": self.best}}
            save_atomic(best, self.run_dir / "best.pt")
        if self.numbered_due:
            self._save_numbered(weights)

    @property
    def numbered_due(self) -> bool:
        return bool(self.cfg.save_every) and self.update % self.cfg.save_every == 0

    def save_numbered(self) -> None:
        """checkpoint_UPDATE.pt alone, between validations (every rank takes part)."""
        weights = self._weights_only(self._payload())
        if self.dist.is_main:
            self._save_numbered(weights)

    def _save_numbered(self, weights: dict) -> None:
        save_atomic(weights, self.run_dir / f"checkpoint_{self.update}.pt")
        numbered = sorted(self.run_dir.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in numbered[: -self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            old.unlink()

    def _weights_only(self, payload: dict) -> dict:
        training_state = ("optimizer", "schedule", "scaler", "task", "trainer")
        weights = {key: value for key, value in payload.items() if key not in training_state}
        weights["trainer"] = {"update": self.update, "valid": self.last_valid}
        return weights

    def close(self) -> None:
        """Release the run directory (also done when `run` ends, however it ends)."""
        self.lock.release()

    # --- the loop ------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _stop_reason(self) -> str | None:
        cfg = self.cfg
        if cfg.max_updates and self.update >= cfg.max_updates:
            return f"reached max_updates {cfg.max_updates}"
        if cfg.max_epochs and self.task.epoch > cfg.max_epochs:
            return f"reached max_epochs {cfg.max_epochs}"
        if cfg.max_time and (self.time_up or self.elapsed_before >= cfg.max_time * 60):
            return f"reached max_time {cfg.max_time} min"
        if cfg.patience and self.bad_validations >= cfg.patience:
            return f"no improvement in {cfg.patience} validations (patience)"
        return None

    def _stop_flags(self) -> list[float]:
        """[time up, save due, stop signal] as numbers for the statistics tensor: rank 0's
        clock decisions, and whether this rank received a stop signal."""
        stop = float(self.signals.received is not None)
        if not self.dist.is_main:
            return [0.0, 0.0, stop]
        now = time.perf_counter()
        time_up = bool(self.cfg.max_time) and self.elapsed() >= self.cfg.max_time * 60
        minutes = self.cfg.save_every_minutes
        save_due = bool(minutes) and now - self.last_save >= minutes * 60
        return [float(time_up), float(save_due), stop]

    def train_step(self) -> tuple[float, float, float, float | None]:
        """One update (update_freq batches); returns summed loss, nll, tokens, grad norm.

        Host-device synchronizations: one per update (the statistics the log needs), one more
        with several workers (the summed loss normalizer) and with fp16 (the loss scaler's
        check for infinite gradients). Everything else stays on the device."""
        cfg = self.cfg
        self.train_model.train()
        self.schedule.set_epoch(self.task.epoch)
        self.schedule.set_update(self.update)
        batches = [self.task.next_batch() for _ in range(self.update_freq)]
        # The gradient is that of (summed loss of all workers) / (their summed normalizer).
        normalizer = getattr(self.task, "loss_normalizer", self.task.batch_tokens)
        total_norm = distributed.all_reduce_sum(
            float(sum(normalizer(b) for b in batches)), self.dist, self.device
        )
        penalty_weight = getattr(self.model_cfg, "projection_reg", 0.0)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, nll
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
            sums += torch.stack([loss.detach(), nll.detach()]).double()
        tokens = float(sum(self.task.batch_tokens(b) for b in batches))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if cfg.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        # loss, nll, tokens and the flags are summed over workers (only rank 0 sets the clock
        # flags); the gradient norm is the same on every worker and is not.
        host = torch.tensor([tokens, *self._stop_flags()], dtype=torch.float64)
        stats = torch.cat([sums, host.to(self.device, non_blocking=True)])
        if self.dist.enabled:
            torch.distributed.all_reduce(stats)
        if grad_norm is not None:
            stats = torch.cat([stats, grad_norm.detach().double().reshape(1)])
        values = stats.tolist()  # the one synchronization of an update
        loss_sum, nll_sum, total_tokens, time_up, save_due, stop = values[:6]
        self.time_up, self.save_due, self.stop_requested = time_up > 0, save_due > 0, stop > 0
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"training diverged at update {self.update + 1}: the loss is {loss_sum}; the last good "
                f"checkpoint is {self.run_dir / 'last.pt'}; lower lr, lengthen warmup or set clip_norm"
            )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update += 1
        self.task.after_update()
        return loss_sum, nll_sum, total_tokens, (values[6] if grad_norm is not None else None)

    def validate(self) -> bool:
        """Validate on rank 0, share the result; return whether the metric improved.

        Raises ValidationInterrupted on every rank when a stop signal interrupts it."""
        result = None
        if self.dist.is_main:
            self.model.eval()
            try:
                # Not inside the training autocast: validation has a precision of its own.
                with (
                    self.signals.interruptible(),
                    autocast_context(self.device, self.valid_precision),
                    torch.no_grad(),
                ):
                    result = self.task.validate(self.model, self.run_dir)
            except ValidationInterrupted:
                result = "interrupted"
            finally:
                self.model.train()
        result = distributed.broadcast_object(result, self.dist)
        if result == "interrupted":
            raise ValidationInterrupted
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

    def _validate_and_save(self) -> None:
        self.validation_pending = True  # until done: a signal may interrupt it
        try:
            improved = self.validate()
        except ValidationInterrupted:
            self._stop_on_signal()
        self.validation_pending = False
        self.save(improved)

    def _stop_on_signal(self) -> None:
        """Write last.pt (every rank takes part) and end the run with the signal's status."""
        self.save(improved=False)
        self.log.write("stopped", {"update": self.update, "signal": self.signals.name})
        where = self.run_dir / "last.pt"
        pending = "; the validation it interrupted comes first" if self.validation_pending else ""
        raise TrainingStopped(
            f"{self.signals.name} at update {self.update}: saved {where}{pending}; "
            "run the same command again to resume",
            self.signals.received or signal.SIGTERM,
        )

    def run(self) -> dict:
        cfg = self.cfg
        if not (cfg.max_updates or cfg.max_epochs or cfg.max_time or cfg.patience):
            raise UserError("set a stopping rule: max_updates, max_epochs, max_time or patience")
        self.started = self.last_save = time.perf_counter()
        bar = None
        if self.dist.is_main:
            bar = progress_bar("train", total=cfg.max_updates or None, unit="upd", initial=self.update)
        window = LogWindow()
        trimmer = HeapTrimmer(self.device)
        try:
            with self.signals:
                reason = self._train(window, trimmer, bar)
        except TrainingStopped as stopped:
            distributed.shutdown(self.dist)
            if not self.dist.is_main:  # rank 0 says it, once
                raise SystemExit(stopped.exit_status) from None
            raise
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
            self.close()
        self.say(f"stopped after update {self.update}: {reason}; best {cfg.valid_metric} {self.best}")
        summary = {
            "update": self.update,
            "best": self.best,
            "reason": reason,
            "elapsed": self.elapsed(),
        }
        distributed.shutdown(self.dist)
        return summary

    def _train(self, window: LogWindow, trimmer: HeapTrimmer, bar) -> str:
        """The loop: updates, validations and saves until a stopping rule holds."""
        cfg = self.cfg
        if self.validation_pending:  # interrupted by a signal: as if it had not been
            self._validate_and_save()
        reason = self._stop_reason()
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
            if self.stop_requested:
                self.validation_pending = due or reason is not None
                self._stop_on_signal()
            if due or reason is not None:
                self._validate_and_save()
                reason = self._stop_reason()
            elif self.save_due:
                self.save(improved=False)
                self.log.write("save", {"update": self.update, "elapsed": round(self.elapsed(), 1)})
            elif self.numbered_due:  # every save_every updates, validated or not
                self.save_numbered()
            for hook in getattr(self, "after_update_hooks", []):
                hook(self)
            if due:
                trimmer.trim()
            elif self.update % RELEASE_MEMORY_EVERY == 0:
                trimmer.check()
        return reason

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
            "tokens_per_update": round(window.tokens / max(1, window.updates), 1),
            "updates_per_s": round(window.updates / seconds, 3),
            "elapsed": round(self.elapsed(), 1),
        }
        if grad_norm is not None:
            record["grad_norm"] = round(grad_norm, 3)
        if self.cfg.compile:
            record["compiled_graphs"] = compiled_graph_count()
        if self.device.type == "cuda":  # a host-side counter: no synchronization
            record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.log.write("train", record)
        if bar is not None and not bar.disable:
            bar.set_postfix(loss=record["loss"], lr=f"{record['lr']:.2e}", tok_s=int(record["tokens_per_s"]))
        elif self.dist.is_main:
            self.say(
                f"update {self.update} epoch {record['epoch']} loss {record['loss']:.3f} "
                f"ppl {record['ppl']:.1f} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s"
            )
