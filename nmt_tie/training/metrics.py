"""Metric records: one JSON object per line in log.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from nmt_tie.errors import UserError


class MetricsLog:
    """Append-only JSONL log plus TensorBoard scalars; inactive on non-zero ranks."""

    def __init__(self, run_dir: Path, active: bool = True, resume_update: int | None = None):
        self.active = active
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if not active:
            return
        if resume_update is not None and self.path.exists():
            # Records written after the checkpoint we resume from would be written again.
            kept = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line).get("update", 0) <= resume_update]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_update is None:
            self.path.write_text("")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is a dependency, but logs must not fail without it
            self.writer = None

    def write(self, kind: str, record: dict) -> None:
        if not self.active:
            return
        record = {"type": kind, **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            update = record.get("update", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("update", "type"):
                    self.writer.add_scalar(f"{kind}/{key}", value, update)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir: Path) -> list[dict]:
    """The records of RUN/log.jsonl; a last line still being written by a running trainer is left
    out (any other line that is not JSON is an error)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((number for number, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == last:
                break  # the line a running trainer is writing
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON record; is this file a run's training log?")
        records.append(record)
    return records
