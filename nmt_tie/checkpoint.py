"""Self-contained checkpoints: config, SentencePiece models, weights, training state.

Checkpoints hold only tensors, numbers, strings and bytes, so they load with
`torch.load(weights_only=True)`: a checkpoint from a stranger cannot run code. They are
written atomically (temporary file, fsync, rename), so a crash during a save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from nmt_tie.artifacts import wrong_kind
from nmt_tie.config import ModelConfig, to_dict
from nmt_tie.data.tokenizer import TextProcessor
from nmt_tie.errors import UserError

FORMAT = "nmt-tie/1"


def temporary_path(path: Path) -> Path:
    """Where `save_atomic` writes before renaming: hidden, beside `path`, one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def save_atomic(payload: dict, path: str | Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A write that fails (a full disk, a quota, an I/O error) is a one-line UserError naming
    `path` and the reason; the temporary file is removed and an earlier `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise UserError(f"{path}: cannot write the checkpoint: {cause.strerror or cause}{kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind a failed save: torch.save reports a failed write to a file object
    as `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos`, with the
    file's OSError (e.g. ENOSPC) as its context."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check an nmt-tie checkpoint, with a one-line error for every way it can fail."""
    path = Path(path)
    if not path.is_file():
        raise UserError(wrong_kind(path, "a checkpoint (.pt)") or f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        corrupt = f"{path}: truncated or corrupt checkpoint ({reason})"
        raise UserError(wrong_kind(path, "a checkpoint (.pt)") or corrupt) from None
    except Exception as err:  # the weights-only unpickler refusing an object
        if "weights_only" in str(err) or "Unsupported" in str(err):
            raise UserError(f"{path}: not a safe nmt-tie checkpoint (it contains code objects)") from None
        raise
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an nmt-tie checkpoint")
    return payload


def vocab_payload(src: TextProcessor, tgt: TextProcessor, joint: bool) -> dict:
    """What `translate` needs to turn raw text into ids and back."""
    return {
        "src_lang": src.lang,
        "tgt_lang": tgt.lang,
        "moses": src.moses,
        "joint": joint,
        "spm_src": src.spm_model,
        "spm_tgt": src.spm_model if joint else tgt.spm_model,  # one bytes object when joint
    }


def processors_from(vocab: dict) -> tuple[TextProcessor, TextProcessor]:
    src = TextProcessor(vocab["src_lang"], vocab["spm_src"], vocab["moses"])
    tgt = TextProcessor(vocab["tgt_lang"], vocab["spm_tgt"], vocab["moses"])
    return src, tgt


def model_payload(model: torch.nn.Module, model_cfg: ModelConfig, vocab: dict, **extra) -> dict:
    """A checkpoint dict: the model's own state dict (each tied matrix once) plus metadata."""
    return {
        "format": FORMAT,
        "model_config": to_dict(model_cfg),
        "vocab": vocab,
        "model": model.state_dict(),
        **extra,
    }


def model_config_of(payload: dict) -> ModelConfig:
    return ModelConfig(**payload["model_config"])


def load_model(payload: dict, device: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint dict (tying restored by construction)."""
    from nmt_tie.model.seq2seq import build_model

    if payload.get("kind") == "lm":
        raise UserError("this is a language-model checkpoint: use `nmt-tie lm eval` or `nmt-tie embeddings`")
    config = model_config_of(payload)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device)


def average_checkpoints(paths: list[Path]) -> dict:
    """Parameter-wise mean of checkpoints of one model (tied matrices stay one tensor).

    Training state (optimizer, data position) is dropped: the result is for translation.
    """
    if not paths:
        raise UserError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    total = {name: tensor.double() for name, tensor in first["model"].items()}
    for path in paths[1:]:
        payload = load_checkpoint(path)
        if payload["model_config"] != first["model_config"]:
            raise UserError(f"{path} has another model config than {paths[0]}; cannot average")
        if payload.get("vocab") != first.get("vocab"):
            raise UserError(f"{path} has another vocabulary than {paths[0]}; cannot average")
        for name, tensor in payload["model"].items():
            total[name] += tensor.double()
    averaged = {name: (tensor / len(paths)).to(first["model"][name].dtype) for name, tensor in total.items()}
    return {
        "format": FORMAT,
        "model_config": first["model_config"],
        "vocab": first.get("vocab"),
        "model": averaged,
        "averaged_from": [str(p) for p in paths],
    }
