"""The things nmt-tie writes to disk, recognized again when a command is handed the wrong one.

Users give `translate -c` a run directory, `export` an export, `translate` an Argos package or a
Hugging Face directory. Every command that reads a checkpoint or an export says the same thing
then: what the path is, and what to give instead. And no command's output replaces one of its
inputs. Torch-free, like the export path that uses it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from nmt_tie.errors import UserError

METADATA_FILE = "nmt_tie.json"  # in every export: what it is and where it came from
CTRANSLATE2_FORMAT = "nmt-tie-ctranslate2/1"
HUGGINGFACE_FORMAT = "nmt-tie-huggingface/1"
CHECKPOINT_NAMES = ("best.pt", "last.pt", "averaged.pt")  # the ones a run directory offers first


def _export_metadata(directory: Path) -> dict:
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _run_checkpoints(directory: Path) -> list[str]:
    named = [name for name in CHECKPOINT_NAMES if (directory / name).is_file()]
    numbered = sorted(p.name for p in directory.glob("*.pt") if p.name not in CHECKPOINT_NAMES)
    return named + numbered


def _is_argos_package(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name.count("/") == 1 and name.endswith("/metadata.json") for name in names)


def _is_transformers_directory(path: Path) -> bool:
    weights = ("model.safetensors", "pytorch_model.bin")
    return (path / "config.json").is_file() and any((path / name).is_file() for name in weights)


def _directory_kind(path: Path) -> tuple[str, str] | None:
    metadata = _export_metadata(path)
    source = f"it was exported from {metadata.get('source_checkpoint', 'a checkpoint')}"
    if metadata.get("format") == CTRANSLATE2_FORMAT:
        return "an nmt-tie CTranslate2 export", source
    if metadata.get("format") == HUGGINGFACE_FORMAT or _is_transformers_directory(path):
        return "a Hugging Face transformers export", f"load it with AutoModelForSeq2SeqLM; {source}"
    if (path / "metadata.json").is_file() and (path / "model" / METADATA_FILE).is_file():
        return "an unpacked Argos Translate package", f"give its model folder, {path / 'model'}"
    if (path / "log.jsonl").is_file() or (path / "config.yaml").is_file():
        checkpoints = ", ".join(str(path / name) for name in _run_checkpoints(path)[:3])
        if checkpoints:
            return "a training run directory", f"give one of its checkpoints: {checkpoints}"
        return "a training run directory without checkpoints yet", "train until it writes last.pt"
    if (path / "prepare.json").is_file():
        return "a prepared data directory", "train on it (nmt-tie train) and give the checkpoint that writes"
    return None


def what_it_is(path: Path) -> tuple[str, str] | None:
    """(what `path` is, what to give instead) for nmt-tie's own kinds of files; None otherwise."""
    path = Path(path)
    if path.is_dir():
        return _directory_kind(path)
    if path.is_file() and _is_argos_package(path):
        kind = "an Argos Translate package"
        return kind, "install it with argospm (nmt-tie reads its model folder unzipped)"
    return None


def wrong_kind(path: Path, wanted: str) -> str | None:
    """The one-line complaint for a path that is one of nmt-tie's kinds but not `wanted`
    ("a checkpoint (.pt)"), or None when `path` is none of them."""
    known = what_it_is(path)
    if known is None:
        return None
    what, instead = known
    return f"{path} is {what}, not {wanted}: {instead}"


def refuse_to_overwrite_an_input(flag: str, output, *inputs) -> None:
    """An output that is also an input would be emptied before (or replace it after) it is read."""
    if not output or not os.path.exists(output):
        return
    for given in inputs:
        if given and os.path.exists(given) and os.path.samefile(given, output):
            raise UserError(f"{flag} {output} is also {given}, an input; write to another file")
