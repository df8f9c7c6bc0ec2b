"""Reading line-aligned text files strictly: UTF-8 checked line by line, optional gzip.

Every error names the file and, where it applies, the line, so that a user can fix the
input without guessing.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nmt_tie.errors import UserError


def split_file(prefix: str | Path, lang: str) -> Path:
    """The file holding one language of a split: `PREFIX.LANG` or `PREFIX.LANG.gz`."""
    plain = Path(f"{prefix}.{lang}")
    zipped = Path(f"{prefix}.{lang}.gz")
    if plain.is_file():
        return plain
    if zipped.is_file():
        return zipped
    raise UserError(f"missing file: {plain} (or {zipped.name})")


def open_binary(path: Path) -> BinaryIO:
    """Open a file for reading bytes, transparently decompressing `.gz`."""
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def decode_line(raw: bytes, path: Path | str, lineno: int) -> str:
    """Decode one line of bytes as UTF-8 without its line ending; name file:line on failure."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}:{lineno}: invalid UTF-8 (byte {err.start + 1} of the line); "
            "convert the file to UTF-8, e.g. with iconv"
        ) from None
    return text.rstrip("\n").rstrip("\r")


def read_lines(path: Path) -> Iterator[str]:
    """Yield the lines of a text file (UTF-8, optionally gzip), without line endings."""
    try:
        with open_binary(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                yield decode_line(raw, path, lineno)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise UserError(f"missing file: {path}") from None
        raise UserError(f"{path}: cannot read ({err})") from None


def count_lines(path: Path) -> int:
    """Number of lines (a last line without a newline counts)."""
    count = 0
    last = b"\n"
    with open_binary(path) as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def read_parallel(src_path: Path, tgt_path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, source line, target line) in lockstep.

    Stops with an error giving both line counts if the files differ in length; the check
    happens when the shorter file ends, so nothing is read twice.
    """
    src_iter = read_lines(src_path)
    tgt_iter = read_lines(tgt_path)
    lineno = 0
    while True:
        src = next(src_iter, None)
        tgt = next(tgt_iter, None)
        if src is None and tgt is None:
            return
        lineno += 1
        if src is None or tgt is None:
            raise UserError(
                f"line counts differ: {src_path} has {count_lines(src_path)} lines, "
                f"{tgt_path} has {count_lines(tgt_path)}"
            )
        yield lineno, src, tgt


def text_writer(path: Path) -> io.TextIOWrapper:
    """A UTF-8 text file for writing with Unix line endings."""
    return open(path, "w", encoding="utf-8", newline="\n")
