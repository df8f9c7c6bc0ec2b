"""Shared fixtures: real corpora from ../shared/data (or NMT_TIE_DATA), small subsets of them."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from nmt_tie.data.locations import data_root
from nmt_tie.data.text import read_lines


@pytest.fixture
def native_cpu_bf16(monkeypatch):
    """Tests of the CPU's bf16 paths run them whatever this CPU has: without AVX512-BF16 or AMX,
    `dtype: bf16` on the CPU becomes fp32 (`devices.effective_dtype`), but the paths still work."""
    from nmt_tie import devices

    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture(scope="session")
def corpora() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def multi30k(corpora) -> Path:
    return corpora / "multi30k"


def write_lines(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
    return path


def subset(multi30k: Path, split: str, lang: str, n: int) -> list[str]:
    lines = []
    for line in read_lines(multi30k / f"{split}.{lang}.gz"):
        lines.append(line)
        if len(lines) == n:
            break
    return lines


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, multi30k) -> Path:
    """3000 training and 200 validation pairs of Multi30k En-De as plain files (prefix dir)."""
    root = tmp_path_factory.mktemp("small_corpus")
    for split, source_split, n in [("train", "train", 3000), ("valid", "val", 200)]:
        for lang in ("en", "de"):
            write_lines(root / f"{split}.{lang}", subset(multi30k, source_split, lang, n))
    return root


def prepare_small(small_corpus: Path, out: Path, **options) -> Path:
    """Prepare the small Multi30k subset (joint BPE of 500 pieces unless told otherwise)."""
    from nmt_tie.data.prepare import PrepareOptions, prepare

    settings = {"vocab_size": 500, **options}
    train, valid = str(small_corpus / "train"), str(small_corpus / "valid")
    prepare(
        PrepareOptions(src="en", tgt="de", train=train, valid=valid, out=out, **settings), log=lambda m: None
    )
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `nmt-tie ARGV` in-process: (exit code, stdout, stderr)."""
    from nmt_tie.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load_script(path: Path) -> ModuleType:
    """A recipe or benchmark script (not part of the package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
