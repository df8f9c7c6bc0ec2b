"""`nmt-tie prepare`: raw parallel text -> BPE model(s), vocabulary, binarized ids, stats.

The prepared directory is written to a temporary sibling and renamed into place only when
complete, so a failed or interrupted run never leaves a directory a later stage would take
as valid. `prepare.json` (written last) records the options and input checksums; re-running
with the same inputs is a no-op, with other inputs it is refused unless `--force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from nmt_tie.data.text import read_lines, read_parallel, split_file, text_writer
from nmt_tie.data.tokenizer import MosesSteps, TextProcessor, train_sentencepiece
from nmt_tie.errors import UserError
from nmt_tie.progress import progress

FORMAT_VERSION = 1
BYTE_AND_SPECIAL_PIECES = 256 + 4  # byte fallback's pieces, <pad> <unk> <s> </s>
CHUNK_LINES = 100_000  # lines held in memory at once, whatever the corpus size


@dataclass
class PrepareOptions:
    src: str
    tgt: str
    train: str
    valid: str
    out: Path
    test: list[str] = field(default_factory=list)
    joint: bool = True
    vocab_size: int = 8000
    moses: bool = False
    max_len: int = 250
    max_ratio: float = 9.0
    force: bool = False
    threads: int = max(1, os.cpu_count() or 1)

    def splits(self) -> dict[str, str]:
        """Split name -> file prefix. Test splits are named after their prefix's file name."""
        named = {"train": self.train, "valid": self.valid}
        for prefix in self.test:
            name = Path(prefix).name
            if name in named:
                raise UserError(f"two splits would be called {name!r}: rename {prefix}")
            named[name] = prefix
        return named

    def recorded(self) -> dict:
        """The options that determine the output (not where it goes or whether to force)."""
        keep = ("src", "tgt", "joint", "vocab_size", "moses", "max_len", "max_ratio")
        return {key: value for key, value in asdict(self).items() if key in keep}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _moses_worker_init(lang: str) -> None:
    global _WORKER_MOSES
    _WORKER_MOSES = MosesSteps(lang)


def _moses_worker(lines: list[str]) -> list[str]:
    return [_WORKER_MOSES.tokenize(line) for line in lines]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Pretokenizer:
    """Moses normalization + tokenization of one language, in worker processes for big inputs."""

    def __init__(self, lang: str, threads: int):
        self.lang = lang
        self.threads = threads
        self._steps = MosesSteps(lang)
        self._pool = None

    def __call__(self, lines: list[str]) -> list[str]:
        if self.threads <= 1 or len(lines) < 20_000:
            return [self._steps.tokenize(line) for line in lines]
        if self._pool is None:
            self._pool = Pool(self.threads, initializer=_moses_worker_init, initargs=(self.lang,))
        return [tok for part in self._pool.imap(_moses_worker, _chunks(lines, 2000)) for tok in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()


def _pair_chunks(src_path: Path, tgt_path: Path, counts: dict, desc: str) -> Iterator[tuple[list, list]]:
    """Non-empty line pairs in chunks; empty ones are counted in counts["empty"]."""
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    for _, src, tgt in progress(read_parallel(src_path, tgt_path), desc=desc, unit="lines"):
        counts["read"] += 1
        if not src.strip() or not tgt.strip():
            counts["empty"] += 1
            continue
        src_lines.append(src)
        tgt_lines.append(tgt)
        if len(src_lines) == CHUNK_LINES:
            yield src_lines, tgt_lines
            src_lines, tgt_lines = [], []
    if src_lines:
        yield src_lines, tgt_lines


def _text_chunks(path: Path, size: int = CHUNK_LINES) -> Iterator[list[str]]:
    lines: list[str] = []
    for line in read_lines(path):
        lines.append(line)
        if len(lines) == size:
            yield lines
            lines = []
    if lines:
        yield lines


class _IdWriter:
    """Appends id sequences to a raw file, then turns it into a memory-mappable .npy."""

    def __init__(self, path: Path, vocab_size: int):
        self.path = path
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.raw = path.with_suffix(".raw")
        self.raw.write_bytes(b"")
        self.lengths: list[np.ndarray] = []

    def write(self, sequences: list[np.ndarray]) -> None:
        if sequences:
            with open(self.raw, "ab") as handle:
                np.concatenate(sequences).astype(self.dtype).tofile(handle)
        self.lengths.append(np.array([len(s) for s in sequences], dtype=np.int64))

    def finish(self, offsets_path: Path) -> int:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        ids = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(total,))
        step = 1 << 24
        with open(self.raw, "rb") as raw:
            for start in range(0, total, step):
                block = np.fromfile(raw, dtype=self.dtype, count=min(step, total - start))
                ids[start : start + len(block)] = block
        ids.flush()
        del ids
        self.raw.unlink()
        np.save(offsets_path, offsets)
        return total


def prepare(opts: PrepareOptions, log=print) -> dict:
    """Run the whole data stage; return the statistics written to stats.json."""
    started = time.perf_counter()
    if opts.src == opts.tgt:
        raise UserError(f"--src and --tgt are both {opts.src!r}; give two different languages")
    if opts.vocab_size <= BYTE_AND_SPECIAL_PIECES:
        raise UserError(
            f"--vocab-size {opts.vocab_size} is too small: {BYTE_AND_SPECIAL_PIECES} byte and special "
            "pieces come first; use a few thousand (8,000 for Multi30k, 32,000 for WMT)"
        )
    splits = opts.splits()
    paths = {
        name: {lang: split_file(prefix, lang) for lang in (opts.src, opts.tgt)}
        for name, prefix in splits.items()
    }
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "options": opts.recorded(),
        "inputs": {
            name: {lang: {"path": str(path), "sha256": sha256_of(path)} for lang, path in p.items()}
            for name, p in paths.items()
        },
    }
    out = Path(opts.out)
    for split_paths in paths.values():
        for path in split_paths.values():
            if out.resolve() in path.resolve().parents:
                # replacing --out (what --force does) would delete the corpus itself
                raise UserError(f"--out {out} holds the input {path}; choose another --out")
    if out.exists():
        recorded = out / "prepare.json"
        if not recorded.is_file() and (not out.is_dir() or any(out.iterdir())):
            # --force replaces an earlier prepared directory (or an empty one), nothing else
            raise UserError(f"{out} exists and is not an nmt-tie prepared directory; choose another --out")
        if not opts.force:
            if recorded.is_file() and _same_inputs(json.loads(recorded.read_text()), fingerprint):
                log(f"{out} is already prepared from these inputs and options; nothing to do")
                return json.loads((out / "stats.json").read_text())
            why = "was prepared from other inputs or options" if recorded.is_file() else "exists"
            raise UserError(f"{out} {why}; choose another --out or pass --force to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _prepare_into(tmp, opts, splits, started, log)
        stats["inputs"] = fingerprint["inputs"]
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        # prepare.json last: its presence marks a complete directory.
        (tmp / "prepare.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _same_inputs(recorded: dict, current: dict) -> bool:
    def strip_paths(fp: dict) -> dict:
        inputs = {
            split: {lang: entry["sha256"] for lang, entry in langs.items()}
            for split, langs in fp.get("inputs", {}).items()
        }
        return {**fp, "inputs": inputs}

    return strip_paths(recorded) == strip_paths(current)


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def _learn_bpe(lines: Iterator[str], files: list[Path], opts: PrepareOptions) -> bytes:
    """SentencePiece BPE on the lines of `files`, with a one-line error when the vocabulary
    size does not fit the text: SentencePiece states its own limits, in its words "Vocabulary
    size too high (300). Please set it to a value <= 275." and "Vocabulary size is smaller
    than required_chars. 262 vs 269." (every character, 256 bytes and 4 specials)."""
    try:
        return train_sentencepiece(lines, opts.vocab_size, opts.threads)
    except RuntimeError as error:
        names = " and ".join(str(path) for path in files)
        if most := re.search(r"Vocabulary size too high \(\d+\).*?<= (\d+)", str(error)):
            raise UserError(
                f"{names}: too little training text for --vocab-size {opts.vocab_size}; "
                f"SentencePiece can make at most {most.group(1)} pieces from it: use --vocab-size "
                f"{most.group(1)} or less, or more training data"
            ) from None
        if least := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error)):
            raise UserError(
                f"{names}: --vocab-size {opts.vocab_size} is too small for this text, whose every "
                f"character is a piece of its own: use --vocab-size {least.group(1)} or more"
            ) from None
        raise


def _prepare_into(tmp: Path, opts: PrepareOptions, splits: dict, started: float, log) -> dict:
    langs = (opts.src, opts.tgt)
    work = tmp / "work"  # pre-tokenized text, removed at the end
    work.mkdir()
    pretokenizers = {lang: Pretokenizer(lang, opts.threads) for lang in langs} if opts.moses else {}
    split_stats: dict[str, dict] = {}
    try:
        # Pass 1: read, drop empty lines, pre-tokenize; keep the raw text of valid/test splits.
        for name, prefix in splits.items():
            paths = {lang: split_file(prefix, lang) for lang in langs}
            counts = {"read": 0, "empty": 0}
            with ExitStack() as stack:
                tokenized = {
                    lang: stack.enter_context(text_writer(work / f"{name}.{lang}")) for lang in langs
                }
                raw = {}
                if name != "train":
                    raw = {
                        lang: stack.enter_context(text_writer(tmp / f"{name}.{lang}.txt")) for lang in langs
                    }
                for chunk in _pair_chunks(paths[opts.src], paths[opts.tgt], counts, f"read {name}"):
                    for lang, lines in zip(langs, chunk, strict=True):
                        if lang in raw:
                            raw[lang].writelines(line + "\n" for line in lines)
                        lines = pretokenizers[lang](lines) if opts.moses else lines
                        tokenized[lang].writelines(line + "\n" for line in lines)
            if counts["read"] == counts["empty"]:
                pair = f"{paths[opts.src]} and {paths[opts.tgt]}"
                raise UserError(f"{name} split is empty: no non-empty line pairs in {pair}")
            split_stats[name] = {
                "files": {lang: str(path) for lang, path in paths.items()},
                "read": counts["read"],
                "kept": 0,
                "dropped": {"empty": counts["empty"], "too_long": 0, "ratio": 0},
                "tokens": {},
            }
    finally:
        for pretokenizer in pretokenizers.values():
            pretokenizer.close()

    # SentencePiece BPE: one joint model, or one per language (sampled from at most 10M lines).
    def training_lines(*files: Path) -> Iterator[str]:
        for path in files:
            yield from read_lines(path)

    if opts.joint:
        model = _learn_bpe(
            training_lines(work / f"train.{opts.src}", work / f"train.{opts.tgt}"),
            [split_file(opts.train, lang) for lang in langs],
            opts,
        )
        (tmp / "spm.model").write_bytes(model)
        models = {lang: model for lang in langs}
    else:
        models = {}
        for lang in langs:
            models[lang] = _learn_bpe(
                training_lines(work / f"train.{lang}"), [split_file(opts.train, lang)], opts
            )
            (tmp / f"spm.{lang}.model").write_bytes(models[lang])
    processors = {lang: TextProcessor(lang, models[lang], opts.moses) for lang in langs}
    for vocab_file, lang in _vocab_files(opts.joint, langs).items():
        (tmp / vocab_file).write_text("\n".join(processors[lang].vocab.pieces) + "\n")

    # Pass 2: encode in chunks, filter the training pairs by length, write memory-mappable ids.
    piece_counts = {lang: np.zeros(len(processors[lang].vocab), dtype=np.int64) for lang in langs}
    for name, stats in split_stats.items():
        writers = {
            lang: _IdWriter(tmp / f"{name}.{lang}.ids.npy", len(processors[lang].vocab)) for lang in langs
        }
        chunks = zip(
            _text_chunks(work / f"{name}.{opts.src}"), _text_chunks(work / f"{name}.{opts.tgt}"), strict=True
        )
        for src_lines, tgt_lines in chunks:
            encoded = {
                opts.src: [np.asarray(ids) for ids in processors[opts.src].encode_pretokenized(src_lines)],
                opts.tgt: [np.asarray(ids) for ids in processors[opts.tgt].encode_pretokenized(tgt_lines)],
            }
            if name == "train":
                keep = _length_filter(encoded[opts.src], encoded[opts.tgt], opts, stats["dropped"])
                encoded = {
                    lang: [s for s, k in zip(seqs, keep, strict=True) if k] for lang, seqs in encoded.items()
                }
            for lang in langs:
                writers[lang].write(encoded[lang])
                if name == "train" and encoded[lang]:
                    flat = np.concatenate(encoded[lang])
                    piece_counts[lang] += np.bincount(flat, minlength=len(piece_counts[lang]))
            stats["kept"] += len(encoded[opts.src])
        for lang in langs:
            stats["tokens"][lang] = writers[lang].finish(tmp / f"{name}.{lang}.offsets.npy")
        if name == "train" and stats["kept"] == 0:
            raise UserError(
                f"every training pair was dropped by --max-len {opts.max_len} / --max-ratio "
                f"{opts.max_ratio} ({stats['dropped']}); relax the filters"
            )
    shutil.rmtree(work)

    overlap = vocabulary_overlap(
        processors[opts.src].vocab.pieces,
        piece_counts[opts.src],
        processors[opts.tgt].vocab.pieces,
        piece_counts[opts.tgt],
    )
    seconds = time.perf_counter() - started
    total_read = sum(s["read"] for s in split_stats.values())
    return {
        "src_lang": opts.src,
        "tgt_lang": opts.tgt,
        "joint": opts.joint,
        "moses": opts.moses,
        "vocab_size": {lang: len(processors[lang].vocab) for lang in langs},
        "max_len": opts.max_len,
        "max_ratio": opts.max_ratio,
        "splits": split_stats,
        "vocabulary_overlap": overlap,
        "seconds": round(seconds, 2),
        "sentence_pairs_per_second": round(total_read / seconds, 1),
    }


def _vocab_files(joint: bool, langs: tuple[str, str]) -> dict[str, str]:
    return {"vocab.txt": langs[0]} if joint else {f"vocab.{lang}.txt": lang for lang in langs}


def _length_filter(src: list[np.ndarray], tgt: list[np.ndarray], opts, dropped: dict) -> np.ndarray:
    src_len = np.array([len(s) for s in src])
    tgt_len = np.array([len(t) for t in tgt])
    too_long = (src_len > opts.max_len) | (tgt_len > opts.max_len)
    ratio = np.maximum(src_len, tgt_len) / np.maximum(1, np.minimum(src_len, tgt_len))
    bad_ratio = ~too_long & (ratio > opts.max_ratio) if opts.max_ratio > 0 else np.zeros_like(too_long)
    dropped["too_long"] += int(too_long.sum())
    dropped["ratio"] += int(bad_ratio.sum())
    return ~(too_long | bad_ratio)


def vocabulary_overlap(
    src_pieces, src_counts: np.ndarray, tgt_pieces, tgt_counts: np.ndarray
) -> dict[str, int]:
    """The paper's Table 1: vocabulary pieces seen only in the source, only in the target, both.

    Pieces are compared as strings, so this works for one joint or two separate vocabularies.
    """
    seen_src = {src_pieces[i] for i in np.flatnonzero(src_counts)}
    seen_tgt = {tgt_pieces[i] for i in np.flatnonzero(tgt_counts)}
    vocabulary = set(src_pieces) | set(tgt_pieces)
    return {
        "source_only": len(seen_src - seen_tgt),
        "target_only": len(seen_tgt - seen_src),
        "both": len(seen_src & seen_tgt),
        "neither": len(vocabulary - seen_src - seen_tgt),
        "vocabulary": len(vocabulary),
    }


def format_stats(stats: dict) -> str:
    """A human-readable summary of stats.json."""
    src, tgt = stats["src_lang"], stats["tgt_lang"]
    lines = [
        f"{src}-{tgt}, {'joint' if stats['joint'] else 'separate'} BPE vocabulary "
        + ", ".join(f"{lang} {n}" for lang, n in stats["vocab_size"].items())
        + (", Moses tokenization" if stats["moses"] else ""),
        "",
        f"{'split':<20}{'read':>9}{'kept':>9}{'empty':>7}{'long':>7}{'ratio':>7}"
        f"{src + ' tokens':>12}{tgt + ' tokens':>12}",
    ]
    for name, split in stats["splits"].items():
        dropped = split["dropped"]
        lines.append(
            f"{name:<20}{split['read']:>9}{split['kept']:>9}{dropped['empty']:>7}"
            f"{dropped['too_long']:>7}{dropped['ratio']:>7}"
            f"{split['tokens'][src]:>12}{split['tokens'][tgt]:>12}"
        )
    overlap = stats["vocabulary_overlap"]
    lines += [
        "",
        f"vocabulary pieces seen in training data (paper's Table 1): only {src} "
        f"{overlap['source_only']}, only {tgt} {overlap['target_only']}, both {overlap['both']}, "
        f"neither {overlap['neither']} (of {overlap['vocabulary']})",
        f"{stats['seconds']} s, {stats['sentence_pairs_per_second']} sentence pairs/s",
    ]
    return "\n".join(lines)


class PreparedData:
    """Read access to a directory written by `nmt-tie prepare`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        record = self.path / "prepare.json"
        if not record.is_file():
            hint = "" if self.path.exists() else " (it does not exist)"
            raise UserError(
                f"{self.path} is not a prepared data directory{hint}; run `nmt-tie prepare` first"
            )
        self.record = json.loads(record.read_text())
        self.stats = json.loads((self.path / "stats.json").read_text())
        options = self.record["options"]
        self.src_lang: str = options["src"]
        self.tgt_lang: str = options["tgt"]
        self.joint: bool = options["joint"]
        self.moses: bool = options["moses"]

    @property
    def splits(self) -> list[str]:
        return list(self.stats["splits"])

    def spm_model(self, lang: str) -> bytes:
        name = "spm.model" if self.joint else f"spm.{lang}.model"
        return (self.path / name).read_bytes()

    def processor(self, side: str) -> TextProcessor:
        """The TextProcessor of the 'src' or 'tgt' side."""
        lang = self.src_lang if side == "src" else self.tgt_lang
        return TextProcessor(lang, self.spm_model(lang), self.moses)

    def raw_text(self, split: str, side: str) -> list[str]:
        lang = self.src_lang if side == "src" else self.tgt_lang
        return list(read_lines(self.path / f"{split}.{lang}.txt"))

    def split_arrays(self, split: str, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(flat ids, offsets) of one side of a split, memory-mapped."""
        if split not in self.stats["splits"]:
            raise UserError(f"{self.path} has no split {split!r}; it has {', '.join(self.splits)}")
        lang = self.src_lang if side == "src" else self.tgt_lang
        ids = np.load(self.path / f"{split}.{lang}.ids.npy", mmap_mode="r")
        offsets = np.load(self.path / f"{split}.{lang}.offsets.npy")
        return ids, offsets
