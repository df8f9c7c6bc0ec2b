"""Training: the generic loop, optimizers and schedules, logging, distributed helpers."""
