"""`nmt-tie prepare` on real Multi30k text: shared vocabulary, round trips, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, write_lines

from nmt_tie.data.prepare import PreparedData, PrepareOptions, prepare
from nmt_tie.data.text import read_lines
from nmt_tie.errors import UserError


def options(small_corpus: Path, out: Path, **kwargs) -> PrepareOptions:
    defaults = dict(
        src="en",
        tgt="de",
        train=str(small_corpus / "train"),
        valid=str(small_corpus / "valid"),
        out=out,
        vocab_size=1000,
    )
    return PrepareOptions(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def joint_dir(tmp_path_factory, multi30k) -> Path:
    out = tmp_path_factory.mktemp("prep") / "joint"
    prepare(
        PrepareOptions(
            src="en",
            tgt="de",
            train=str(multi30k / "train"),
            valid=str(multi30k / "val"),
            test=[str(multi30k / "test_2016_flickr")],
            out=out,
            vocab_size=8000,
        ),
        log=lambda m: None,
    )
    return out


def test_joint_vocabulary_is_one_model_shared_by_both_sides(joint_dir):
    data = PreparedData(joint_dir)
    assert data.joint
    assert (joint_dir / "spm.model").is_file()
    assert not list(joint_dir.glob("spm.*.model"))
    src, tgt = data.processor("src"), data.processor("tgt")
    assert src.vocab == tgt.vocab and len(src.vocab) == 8000
    assert (joint_dir / "vocab.txt").read_text().splitlines() == list(src.vocab.pieces)
    # The same German word gets the same ids whichever side encodes it.
    assert src.encode(["Hund"]) == tgt.encode(["Hund"])


def test_stats_count_every_line_and_the_vocabulary_overlap(joint_dir):
    stats = json.loads((joint_dir / "stats.json").read_text())
    assert stats["splits"]["train"]["read"] == 29000
    assert stats["splits"]["valid"]["read"] == 1014
    assert stats["splits"]["test_2016_flickr"]["read"] == 1000
    for split in stats["splits"].values():
        assert split["kept"] + sum(split["dropped"].values()) == split["read"]
    overlap = stats["vocabulary_overlap"]
    parts = overlap["source_only"] + overlap["target_only"] + overlap["both"] + overlap["neither"]
    assert parts == overlap["vocabulary"] == 8000
    # German and English share many pieces (names, punctuation, numbers) but not all.
    assert overlap["both"] > 500 and overlap["source_only"] > 500 and overlap["target_only"] > 500


def test_binarized_ids_are_memory_mapped_and_decode_to_the_raw_text(joint_dir):
    data = PreparedData(joint_dir)
    ids, offsets = data.split_arrays("valid", "tgt")
    assert isinstance(ids, np.memmap)
    assert len(offsets) == 1015
    tgt = data.processor("tgt")
    raw = data.raw_text("valid", "tgt")
    for i in (0, 500, 1013):
        assert tgt.decode(ids[offsets[i] : offsets[i + 1]]) == " ".join(raw[i].split())


def test_round_trip_on_real_lines_without_moses(joint_dir, multi30k):
    # Unseen test lines, both languages: decoding gives back the text (SentencePiece only
    # collapses runs of spaces), and byte fallback means no line ever needs <unk>.
    data = PreparedData(joint_dir)
    for side, lang in (("src", "en"), ("tgt", "de")):
        lines = list(read_lines(multi30k / f"test_2016_flickr.{lang}.gz"))
        processor = data.processor(side)
        encoded = processor.encode(lines)
        assert all(1 not in ids for ids in encoded)  # UNK_ID
        assert [processor.decode(ids) for ids in encoded] == [" ".join(x.split()) for x in lines]
        assert processor.decode(processor.encode(["Straße • naïve ☃ 東京"])[0]) == "Straße • naïve ☃ 東京"


def test_round_trip_with_moses(tmp_path, small_corpus, multi30k):
    out = tmp_path / "moses"
    prepare(options(small_corpus, out, moses=True), log=lambda m: None)
    data = PreparedData(out)
    assert data.moses
    for side, lang in (("src", "en"), ("tgt", "de")):
        processor = data.processor(side)
        lines = list(read_lines(multi30k / f"val.{lang}.gz"))[:300]
        # Moses splits punctuation off: the pieces never glue "dog." together.
        assert processor.pretokenize("A dog.") == "A dog ."
        decoded = [processor.decode(ids) for ids in processor.encode(lines)]
        differ = [(d, x) for d, x in zip(decoded, lines, strict=True) if d != " ".join(x.split())]
        assert len(differ) / len(lines) < 0.03, differ[:5]


def test_separate_vocabularies(tmp_path, small_corpus):
    out = tmp_path / "separate"
    stats = prepare(options(small_corpus, out, joint=False), log=lambda m: None)
    data = PreparedData(out)
    assert not data.joint
    assert (out / "spm.en.model").is_file() and (out / "spm.de.model").is_file()
    assert (out / "vocab.en.txt").is_file() and (out / "vocab.de.txt").is_file()
    # Equal sizes, different pieces: exactly the case that must never be tied by index.
    assert len(data.processor("src").vocab) == len(data.processor("tgt").vocab) == 1000
    assert data.processor("src").vocab != data.processor("tgt").vocab
    assert stats["vocabulary_overlap"]["vocabulary"] > 1000


def test_gzip_and_plain_inputs_give_the_same_result(tmp_path, small_corpus):
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for split in ("train", "valid"):
        for lang in ("en", "de"):
            write_lines(zipped / f"{split}.{lang}.gz", list(read_lines(small_corpus / f"{split}.{lang}")))
    a = prepare(options(small_corpus, tmp_path / "a"), log=lambda m: None)
    b = prepare(options(zipped, tmp_path / "b"), log=lambda m: None)
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()
    assert a["splits"]["train"]["tokens"] == b["splits"]["train"]["tokens"]


def test_empty_lines_and_length_filters_are_counted(tmp_path, small_corpus):
    src = list(read_lines(small_corpus / "train.en"))[:1000]
    tgt = list(read_lines(small_corpus / "train.de"))[:1000]
    src[10] = ""
    tgt[20] = "   "
    src[30] = "word " * 300  # too long
    tgt[40] = "Ein Hund " * 12  # 1-2 pieces against ~25: ratio
    src[40] = "Dog"
    write_lines(tmp_path / "train.en", src)
    write_lines(tmp_path / "train.de", tgt)
    stats = prepare(
        options(small_corpus, tmp_path / "out", train=str(tmp_path / "train"), max_len=100, max_ratio=5),
        log=lambda m: None,
    )
    train = stats["splits"]["train"]
    assert train["read"] == 1000
    assert train["dropped"]["empty"] == 2
    assert train["dropped"]["too_long"] == 1
    assert train["dropped"]["ratio"] >= 1
    assert train["kept"] == 1000 - sum(train["dropped"].values())
    ids, offsets = PreparedData(tmp_path / "out").split_arrays("train", "src")
    assert len(offsets) - 1 == train["kept"]


# --- bad input: one line naming the file (and line), exit code 2, nothing half-written ---


def assert_clean_failure(capsys, out: Path, *argv: str, vocab_size: int = 500) -> str:
    code, stdout, stderr = run_cli(
        capsys, "prepare", *argv, "--out", str(out), "--vocab-size", str(vocab_size)
    )
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return stderr


def splits_args(prefix: Path) -> list[str]:
    return ["--src", "en", "--tgt", "de", "--train", str(prefix), "--valid", str(prefix)]


def test_mismatched_line_counts_give_both_counts(tmp_path, capsys):
    write_lines(tmp_path / "c.en", ["a b", "c d", "e f"])
    write_lines(tmp_path / "c.de", ["a b", "c d"])
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    assert "c.en has 3 lines" in err and "c.de has 2" in err


def test_invalid_utf8_names_file_and_line(tmp_path, capsys):
    write_lines(tmp_path / "c.en", ["a b", "c d", "e f"])
    (tmp_path / "c.de").write_bytes(b"a b\nc \xff d\ne f\n")
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    assert f"{tmp_path / 'c.de'}:2: invalid UTF-8" in err


def test_missing_file(tmp_path, capsys):
    write_lines(tmp_path / "c.en", ["a b"])
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    assert "missing file" in err and "c.de" in err


def test_empty_training_split(tmp_path, capsys):
    write_lines(tmp_path / "c.en", ["", " "])
    write_lines(tmp_path / "c.de", ["x", ""])
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    assert "train split is empty" in err and "c.en" in err


def test_too_little_text_for_the_vocabulary_says_the_largest_size_that_works(tmp_path, capsys):
    write_lines(tmp_path / "c.en", ["a small dog runs", "two cats sleep"])
    write_lines(tmp_path / "c.de", ["ein kleiner Hund rennt", "zwei Katzen schlafen"])
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    assert f"{tmp_path / 'c.en'} and {tmp_path / 'c.de'}: too little training text" in err
    largest = int(err.split("use --vocab-size ")[1].split()[0])
    assert 260 < largest < 500
    args = ("prepare", *splits_args(tmp_path / "c"), "--out", str(tmp_path / "out"))
    assert run_cli(capsys, *args, "--vocab-size", str(largest))[0] == 0
    assert len(PreparedData(tmp_path / "out").processor("src").vocab) == largest


def test_more_characters_than_the_vocabulary_holds_says_the_smallest_size(tmp_path, capsys):
    # every character is a piece of its own (coverage 1.0): 400 CJK characters need > 500
    chars = [chr(0x4E00 + i) for i in range(400)]
    lines = ["".join(chars[i : i + 20]) for i in range(0, 400, 20)] * 20
    write_lines(tmp_path / "c.en", lines)
    write_lines(tmp_path / "c.de", lines)
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(tmp_path / "c"))
    smallest = int(err.split("use --vocab-size ")[1].split()[0])
    assert 400 + 260 <= smallest < 700  # and the word boundary "▁"
    args = ("prepare", *splits_args(tmp_path / "c"), "--out", str(tmp_path / "out"))
    assert run_cli(capsys, *args, "--vocab-size", str(smallest))[0] == 0


def test_a_vocabulary_smaller_than_the_byte_pieces_is_refused(tmp_path, small_corpus, capsys):
    err = assert_clean_failure(capsys, tmp_path / "out", *splits_args(small_corpus / "train"), vocab_size=260)
    assert "--vocab-size 260 is too small" in err


def test_existing_directory_from_other_inputs_is_refused_unless_forced(tmp_path, small_corpus, capsys):
    out = tmp_path / "out"
    argv = [
        "prepare",
        "--src",
        "en",
        "--tgt",
        "de",
        "--train",
        str(small_corpus / "train"),
        "--valid",
        str(small_corpus / "valid"),
        "--out",
        str(out),
        "--vocab-size",
        "500",
    ]
    assert run_cli(capsys, *argv)[0] == 0
    model = (out / "spm.model").read_bytes()
    # Same inputs and options: nothing to do, nothing changes.
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "nothing to do" in err
    # Other options: refused, the existing directory untouched.
    code, _, err = run_cli(capsys, *argv[:-1], "600")
    assert code == 2 and "other inputs or options" in err and "--force" in err
    assert (out / "spm.model").read_bytes() == model
    # A directory that is not a prepared one is never replaced, not even with --force.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        code, _, err = run_cli(capsys, *argv[:-3], str(tmp_path / "other"), "--vocab-size", "500", *force)
        assert code == 2 and "not an nmt-tie prepared directory" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # --force replaces it.
    assert run_cli(capsys, *argv[:-1], "600", "--force")[0] == 0
    assert len(PreparedData(out).processor("src").vocab) == 600


def test_force_never_deletes_the_corpus_it_reads(tmp_path, capsys):
    write_lines(tmp_path / "train.en", ["a small dog runs", "two cats sleep"])
    write_lines(tmp_path / "train.de", ["ein kleiner Hund rennt", "zwei Katzen schlafen"])
    argv = ("prepare", *splits_args(tmp_path / "train"), "--vocab-size", "270", "--force")
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path))
    assert code == 2 and f"--out {tmp_path} holds the input {tmp_path / 'train.en'}" in err
    assert (tmp_path / "train.en").is_file() and (tmp_path / "train.de").is_file()


def test_a_directory_without_prepare_json_is_not_accepted(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a prepared data directory"):
        PreparedData(tmp_path / "half")


def test_help_exists_for_each_command(capsys):
    for argv in (["--help"], ["prepare", "--help"], ["data", "fetch", "--help"]):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "usage: nmt-tie" in out
