"""Raw text in, detokenized translations out: batching, search, streaming file handling.

Output has exactly one line per input line: an empty input line gives an empty output
line, an over-long one is truncated (with a warning naming the line). Input is read in
buffers of lines that are sorted by length into batches of at most `max_tokens` source
tokens, translated, and written back in input order as soon as a buffer is done; from a
pipe, whatever lines have arrived are translated without waiting for a full buffer.

`TextTranslator` does the text side for any search; `Translator` searches with PyTorch
checkpoints, `nmt_tie.deploy.ExportedTranslator` with CTranslate2 exports. This module
imports PyTorch only when a `Translator` is made, so translating through an export never
loads it (about 160 MB and a second of start-up less).
"""

from __future__ import annotations

import gzip
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from nmt_tie.data.text import decode_line
from nmt_tie.data.tokenizer import EOS_ID, TextProcessor
from nmt_tie.errors import UserError
from nmt_tie.hypotheses import Hypothesis, SearchOptions

if TYPE_CHECKING:
    import torch


class TextTranslator:
    """Raw text to translations around a search over piece ids (`translate_ids`): encoding,
    truncation of over-long inputs, empty lines, decoding. Subclasses run the search."""

    def __init__(
        self,
        src: TextProcessor,
        tgt: TextProcessor,
        options: SearchOptions | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.src, self.tgt = src, tgt
        self.options = options or SearchOptions()
        self.warn = warn or (lambda message: print(message, file=sys.stderr))
        # told how many lines are done as batches finish (a progress bar's update)
        self.lines_done: Callable[[int], object] = lambda count: None

    def translate_ids(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        """Hypotheses (best first) for id sequences (without EOS), in input order."""
        raise NotImplementedError

    def translate(
        self, lines: list[str], first_line: int = 1, name: str = "input"
    ) -> list[list[tuple[str, float]]]:
        """(text, score) hypotheses per line; empty lines get an empty hypothesis list."""
        todo = [i for i, line in enumerate(lines) if line.strip()]
        self.lines_done(len(lines) - len(todo))
        encoded = self.src.encode([lines[i] for i in todo])
        limit = self.options.max_src_len
        for i, ids in zip(todo, encoded, strict=True):
            if len(ids) > limit:
                self.warn(f"{name}:{first_line + i}: {len(ids)} subwords, truncated to {limit}")
                del ids[limit:]
        out: list[list[tuple[str, float]]] = [[] for _ in lines]
        for i, hyps in zip(todo, self.translate_ids(encoded), strict=True):
            out[i] = [(self.tgt.decode(h.tokens), h.score) for h in hyps]
        return out


class Translator(TextTranslator):
    """Translation with nmt-tie checkpoints (one, or several as an ensemble) in PyTorch."""

    def __init__(
        self,
        models: list,
        src: TextProcessor,
        tgt: TextProcessor,
        options: SearchOptions | None = None,
        device: torch.device | str = "cpu",
        dtype: str = "fp32",
        warn: Callable[[str], None] | None = None,
    ):
        import torch

        from nmt_tie.devices import describe_precision, effective_dtype
        from nmt_tie.search import Ensemble

        super().__init__(src, tgt, options, warn)
        self.ensemble = Ensemble(models)
        self.device = torch.device(device)
        self.dtype = effective_dtype(self.device, dtype)
        if self.dtype != dtype:
            self.warn(describe_precision(self.device, dtype, self.dtype, tf32=False))

    @classmethod
    def from_checkpoints(
        cls, paths: list, options=None, device="cpu", dtype="fp32", warn=None, compile: bool = False
    ):
        """`compile`: decode through torch.compile'd decoder steps (Transformers; see
        `EncoderDecoder.compile_decoding`). It compiles for a minute or two at the start and
        pays only on long inputs (README, Speed)."""
        import torch

        from nmt_tie.checkpoint import load_checkpoint, load_model, processors_from
        from nmt_tie.devices import effective_dtype

        payloads = [load_checkpoint(p) for p in paths]
        for path, payload in zip(paths, payloads, strict=True):
            if payload.get("kind") == "lm":
                raise UserError(f"{path} is a language-model checkpoint: it does not translate")
        first = payloads[0]["vocab"]
        for path, payload in zip(paths[1:], payloads[1:], strict=True):
            vocab = payload["vocab"]
            if vocab["spm_src"] != first["spm_src"] or vocab["spm_tgt"] != first["spm_tgt"]:
                raise UserError(f"{path} has another vocabulary than {paths[0]}: an ensemble needs one")
            if vocab["moses"] != first["moses"]:
                raise UserError(f"{path} and {paths[0]} differ in Moses pre-processing")
        device = torch.device(device)
        models = [load_model(p, device).eval() for p in payloads]
        eager = []  # asked to compile, but decoding eagerly (RNNs)
        for path, model in zip(paths, models, strict=True):
            if compile and not model.compile_decoding():
                eager.append(path)
        if device.type == "cpu":
            used = effective_dtype(device, dtype)
            for model in models:
                # not fp32 (model/packed.py); not when compiling either: packed kernels
                # under torch.compile are untried (no CPU here had native bf16 to try them)
                if used == "bf16" and not compile:
                    model.pack_for_cpu_inference(torch.bfloat16)
                elif used == "fp32":
                    model.embeddings.fold_output_bias_for_cpu()
        src, tgt = processors_from(first)
        translator = cls(models, src, tgt, options, device, dtype, warn)
        for path in eager:
            translator.warn(
                f"{path}: only a Transformer's decoding step compiles; this model decodes eagerly"
            )
        return translator

    def _search(self, src: torch.Tensor) -> list[list]:
        from nmt_tie.devices import autocast_context
        from nmt_tie.search import beam_search, greedy_search, max_lengths

        opts = self.options
        limit = max_lengths(src, opts.max_len_a, opts.max_len_b)
        with autocast_context(self.device, self.dtype):
            if opts.beam == 1:
                return [[h] for h in greedy_search(self.ensemble, src, limit)]
            return beam_search(
                self.ensemble, src, limit, opts.beam, opts.lenpen, opts.nbest, opts.length_norm
            )

    def translate_ids(self, sources: list[list[int]]) -> list[list]:
        """Hypotheses (best first) for id sequences, batched by length; input order kept."""
        from nmt_tie.data.batching import ladder_down, ladder_up, pad_sequences
        from nmt_tie.devices import release_free_memory

        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        results: list = [None] * len(sources)
        start = 0
        while start < len(order):
            # widths and sentence counts on the shape ladder: few distinct shapes
            longest = ladder_up(len(sources[order[start]]) + 1)
            size = ladder_down(max(1, self.options.max_tokens // longest))
            chunk = order[start : start + size]
            src = pad_sequences([sources[i] for i in chunk], None, EOS_ID, ladder=True).to(self.device)
            for i, hyps in zip(chunk, self._search(src), strict=True):
                results[i] = hyps
            self.lines_done(len(chunk))
            release_free_memory(self.device)  # bf16 decoding leaves free heap pages behind
            start += size
        return results


def _decoded_batches(raw_lines, name: str, max_lines: int, flush_on_pause: bool = False):
    """(first line number, lines) batches of at most `max_lines` decoded lines.

    `raw_lines` may yield None for a pause in the input (nothing more waiting in a pipe):
    with `flush_on_pause`, whatever has arrived is handed out then. Invalid UTF-8 stops with
    file:line, after the lines before it have been handed out.
    """
    pending: list[str] = []
    first, lineno = 1, 0
    for raw in raw_lines:
        if raw is not None:
            lineno += 1
            try:
                pending.append(decode_line(raw, name, lineno))
            except UserError:
                if pending:
                    yield first, pending  # translate what came before, then stop
                raise
        if pending and (len(pending) >= max_lines or (raw is None and flush_on_pause)):
            yield first, pending
            first += len(pending)
            pending = []
    if pending:
        yield first, pending


def _fd_lines(fd: int):
    """Raw lines from a file descriptor, with None whenever no more input is waiting."""
    tail = b""
    while True:
        if not _readable_now(fd):
            yield None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *complete, tail = (tail + chunk).split(b"\n")
        yield from complete
    if tail:
        yield tail


def line_batches(fd: int, name: str, max_lines: int) -> Iterator[tuple[int, list[str]]]:
    """(first line number, lines) from a file descriptor: full buffers from files, whatever
    has arrived from a pipe or terminal. Invalid UTF-8 stops with file:line, after the lines
    before it have been handed out."""
    return _decoded_batches(_fd_lines(fd), name, max_lines, flush_on_pause=True)


def _readable_now(fd: int) -> bool:
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def gzip_line_batches(path: str, max_lines: int) -> Iterator[tuple[int, list[str]]]:
    with gzip.open(path, "rb") as handle:
        yield from _decoded_batches((raw.rstrip(b"\n") for raw in handle), path, max_lines)


def translate_stream(
    translator: TextTranslator, source: str | None, target: str | None, buffer_lines: int = 1000
) -> int:
    """Translate a file (or stdin) into a file (or stdout); return the number of lines.

    With a terminal on stderr and the translations going elsewhere, a progress bar counts the
    lines; a summary line (lines, output words, seconds) ends on stderr."""
    from nmt_tie.data.text import count_lines
    from nmt_tie.progress import progress_bar

    name = source or "<stdin>"
    nbest = translator.options.nbest > 1
    count = words = 0
    started = time.perf_counter()
    with ExitStack() as stack:
        shown = target is not None or not sys.stdout.isatty()  # not over the translations
        bar = stack.enter_context(progress_bar("translate", None, "lines", enabled=shown))
        translator.lines_done = bar.update
        stack.callback(setattr, translator, "lines_done", lambda count: None)
        if not bar.disable:
            # counted only in a regular file: counting would drain a named pipe (-i <(...))
            if source is not None and Path(source).is_file():
                bar.total = count_lines(Path(source))
            # warnings above the bar, not through it
            stack.callback(setattr, translator, "warn", translator.warn)
            translator.warn = lambda message: bar.write(message, file=sys.stderr)
        if source and source.endswith(".gz"):
            batches = gzip_line_batches(source, buffer_lines)
        else:
            if source:
                try:
                    fd = stack.enter_context(open(source, "rb")).fileno()
                except OSError as err:
                    raise UserError(f"cannot read {source}: {err.strerror}") from None
            else:
                fd = sys.stdin.fileno()
            batches = line_batches(fd, name, buffer_lines)
        out = stack.enter_context(open(target, "w", encoding="utf-8", newline="\n")) if target else sys.stdout
        for first, lines in batches:
            for offset, hyps in enumerate(translator.translate(lines, first, name)):
                if nbest:
                    for text, score in hyps or [("", 0.0)]:
                        out.write(f"{first + offset}\t{score:.4f}\t{text}\n")
                else:
                    out.write((hyps[0][0] if hyps else "") + "\n")
                words += len(hyps[0][0].split()) if hyps else 0
            out.flush()
            count += len(lines)
    seconds = time.perf_counter() - started
    lines = "line" if count == 1 else "lines"
    print(f"translated {count:,} {lines} into {words:,} words in {seconds:.1f} s", file=sys.stderr)
    return count
