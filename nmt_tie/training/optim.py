"""Optimizers and learning-rate schedules, with state for exact resumption."""

from __future__ import annotations

import math

import torch

from nmt_tie.config import TrainConfig
from nmt_tie.errors import UserError

FUSED_ADAM_DEVICES = ("cpu", "cuda")


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (Transformer), Adadelta (the paper's RNN, lr 1.0) or SGD (language models).

    Adam is the fused implementation (one kernel over all parameters) where PyTorch has one:
    on 2 CPU threads its step for the 7.6M-parameter Transformer takes 9 ms against 25-45 ms
    for the default loop over 102 tensors (a bf16 update takes about 0.6 s)."""
    params = list(params)
    if cfg.optimizer == "adam":
        fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
        return torch.optim.Adam(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, rho=cfg.rho, eps=1e-6, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise UserError(f"optimizer: {cfg.optimizer!r} is not one of adam, adadelta, sgd")


class LRSchedule:
    """inverse_sqrt: linear warm-up to `lr`, then lr * sqrt(warmup / update) (Vaswani et al.).
    plateau: `lr` until a validation fails to improve, then times `lr_decay` (>= min_lr).
    epoch_decay: `lr` until epoch `decay_start`, then divided by `1 / lr_decay` per epoch
    (the Zaremba schedule for language models). constant: `lr` throughout.
    linear: linear warm-up to `lr`, then linear decay to 0 at `max_updates` (for a fixed budget
    of updates: the last updates take small steps, as averaging checkpoints would smooth them)."""

    KINDS = ("inverse_sqrt", "plateau", "constant", "epoch_decay", "linear")

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, decay_start: int = 0):
        if cfg.schedule not in self.KINDS:
            raise UserError(f"schedule: {cfg.schedule!r} is not one of {', '.join(self.KINDS)}")
        if cfg.schedule == "linear" and cfg.max_updates <= max(1, cfg.warmup):
            raise UserError(
                f"schedule: linear decays to 0 at max_updates, which must be above warmup "
                f"({cfg.max_updates} <= {cfg.warmup})"
            )
        self.optimizer = optimizer
        self.kind = cfg.schedule
        self.max_updates = cfg.max_updates
        self.base_lr = cfg.lr
        self.warmup = max(1, cfg.warmup)
        self.decay = cfg.lr_decay
        self.min_lr = cfg.min_lr
        self.decay_start = decay_start
        self.plateau_lr = cfg.lr
        self.set_update(0)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_update(self, update: int) -> None:
        """Called before every update with the number of updates done so far."""
        if self.kind == "inverse_sqrt":
            step = update + 1
            self._apply(self.base_lr * min(step / self.warmup, math.sqrt(self.warmup / step)))
        elif self.kind == "plateau":
            self._apply(self.plateau_lr)
        elif self.kind == "constant":
            self._apply(self.base_lr)
        elif self.kind == "linear":
            step = update + 1
            left = (self.max_updates - update) / (self.max_updates - self.warmup)
            self._apply(self.base_lr * min(step / self.warmup, left))

    def set_epoch(self, epoch: int) -> None:
        if self.kind == "epoch_decay":
            self._apply(self.base_lr * self.decay ** max(0, epoch - self.decay_start))

    def on_validation(self, improved: bool) -> None:
        if self.kind == "plateau" and not improved:
            self.plateau_lr = max(self.min_lr, self.plateau_lr * self.decay)
            self._apply(self.plateau_lr)

    def state_dict(self) -> dict:
        return {"plateau_lr": self.plateau_lr, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_lr = state["plateau_lr"]
        self._apply(state["lr"])
