"""The distillation recipe (issue 42): the distilled corpus has a line for every training line,
the students are the sizes their configs promise, and a rerun skips what is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare_small, subset, write_lines
from test_train import write_config

from nmt_tie.config import load_config
from nmt_tie.report import count_unique, meta_model
from nmt_tie.training.trainer import Trainer
from nmt_tie.training.translation import TranslationTask

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "distill"


@pytest.mark.parametrize("student, params", [("6-1", 4_035_424), ("4-1", 3_145_696)])
def test_the_students_are_three_way_tied_with_a_deep_encoder_and_one_decoder_layer(student, params):
    model_cfg, train_cfg = load_config(RECIPE / f"student-{student}.yaml")
    assert model_cfg.tie == "all" and model_cfg.dec_layers == 1
    assert model_cfg.enc_layers == int(student.split("-")[0]) and model_cfg.emb_dim == 192
    sized = model_cfg.__class__(**{**model_cfg.__dict__, "src_vocab_size": 4000, "tgt_vocab_size": 4000})
    sized.shared_vocab = True
    # parameters at the recipe's 4,000-piece vocabulary: at one byte each in int8, plus the
    # position table (512 rows, float32) and the SentencePiece model, under the 4.7 MB
    assert count_unique(meta_model(sized)) == params
    assert params + 512 * 192 * 4 + 200_000 < 4.7e6
    assert train_cfg.valid_metric == "bleu" and train_cfg.patience > 0  # chosen on validation
    other = "4-1" if student == "6-1" else "6-1"
    mine = (RECIPE / f"student-{student}.yaml").read_text().splitlines()
    theirs = (RECIPE / f"student-{other}.yaml").read_text().splitlines()
    differing = [a for a, b in zip(mine, theirs, strict=True) if a != b]
    assert all(line.startswith(("enc_layers:", "save_dir:")) for line in differing)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, multi30k) -> Path:
    """A Multi30k-shaped directory: 600 training pairs, 30 for validation and test."""
    root = tmp_path_factory.mktemp("distill-corpus")
    for split, source, n in [
        ("train", "train", 600),
        ("val", "val", 30),
        ("test_2016_flickr", "test_2016_flickr", 30),
    ]:
        for lang in ("en", "de"):
            write_lines(root / f"{split}.{lang}", subset(multi30k, source, lang, n))
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, small_corpus) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    data = prepare_small(small_corpus, root / "prep")
    config = write_config(root / "c.yaml", data, root / "run", max_updates=30, valid_every=1000, warmup=10)
    Trainer(TranslationTask, *load_config(config), log=lambda m: None).run()
    return root / "run" / "last.pt"


def run_recipe(corpus: Path, teacher: Path, runs: Path, results: Path) -> subprocess.CompletedProcess:
    overrides = ["emb_dim=32", "ffn_dim=64", "heads=2", "max_updates=4", "valid_every=2", "save_every=2"]
    overrides += ["threads=1", "valid_max_sentences=10", "patience=0"]
    command = [sys.executable, str(RECIPE / "run.py"), "--teacher", str(teacher), "--students", "4-1"]
    command += [
        "--corpus",
        str(corpus),
        "--runs",
        str(runs),
        "--results",
        str(results),
        "--vocab-size",
        "400",
    ]
    command += ["--speed-threads", "1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_the_recipe_distills_ships_summarizes_and_skips_what_is_done(corpus, teacher, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    first = run_recipe(corpus, teacher, runs, results)
    assert first.returncode == 0, first.stdout + first.stderr
    # one distilled line per training line, the sources as they were
    sources = (corpus / "train.en").read_text().splitlines()
    assert (runs / "corpus-distilled" / "train.en").read_text().splitlines() == sources
    distilled = (runs / "corpus-distilled" / "train.de").read_text().splitlines()
    assert len(distilled) == len(sources) and distilled != (corpus / "train.de").read_text().splitlines()
    summary = json.loads((results / "distilled-student-4-1-seed1.json").read_text())
    for key in (
        "shipped_bytes",
        "bleu",
        "chrf",
        "sentences_per_s",
        "sentences_per_s_greedy",
        "bleu_signature",
    ):
        assert key in summary, key
    export = runs / "distilled" / "student-4-1-seed1" / "export-int8"
    assert summary["shipped_bytes"] == sum(p.stat().st_size for p in export.iterdir() if p.is_file())
    assert json.loads((export / "nmt_tie.json").read_text())["max_positions"] == 512
    # the model card says how the training data was made, and from which teacher
    card = (export / "README.md").read_text()
    assert "knowledge distillation" in card and str(teacher) in card and "real references" in card
    # a rerun translates nothing again and trains nothing again
    second = run_recipe(corpus, teacher, runs, results)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "teacher.de is up to date: not translating again" in second.stdout
    assert "nothing to do" in second.stderr  # prepare
    assert "is up to date: not translating again" in second.stdout.split("teacher.de")[-1]
    # a translation cut short is redone, not trained on
    (runs / "teacher.de").write_text("only one line\n")
    (runs / "teacher.de").touch()
    third = run_recipe(corpus, teacher, runs, results)
    assert (
        third.returncode == 2 and "teacher.de has 1 lines for 600 sources; rerun to redo it" in third.stderr
    )
    assert not (runs / "teacher.de").exists()


SHIPPED = RECIPE / "en-de-student"
RESULTS = RECIPE.parents[1] / "recipes" / "multi30k" / "results" / "distill"


def test_the_shipped_student_translates_right_after_install(multi30k, tmp_path, capsys):
    """The committed int8 student (recipes/distill/en-de-student): at most 10% of the untied fp32
    checkpoint's bytes, its card says how it was made, and `nmt-tie translate -c` translates
    test2016 with it as its summary says (BLEU on the first 200 sentences, recomputed)."""
    pytest.importorskip("ctranslate2")
    import sacrebleu
    from conftest import run_cli

    summary = json.loads((RESULTS / "distilled-student-4-1-seed1.json").read_text())
    shipped = sum(path.stat().st_size for path in SHIPPED.iterdir() if path.is_file())
    assert shipped <= 0.10 * summary["untied_fp32_bytes"] and shipped < 5_000_000
    assert summary["bleu"] >= summary["untied_bleu"]
    metadata = json.loads((SHIPPED / "nmt_tie.json").read_text())
    assert (metadata["tie"], metadata["quantization"]) == ("all", "int8")
    assert "knowledge distillation" in (SHIPPED / "README.md").read_text()
    sources = write_lines(tmp_path / "test.en", subset(multi30k, "test_2016_flickr", "en", 200))
    references = subset(multi30k, "test_2016_flickr", "de", 200)
    out = tmp_path / "test.hyp"
    command = ["translate", "-c", str(SHIPPED), "-i", str(sources), "-o", str(out), "--beam", "5"]
    code, _, err = run_cli(capsys, *command)
    assert code == 0, err
    hypotheses = out.read_text(encoding="utf-8").splitlines()
    assert len(hypotheses) == 200
    assert sacrebleu.corpus_bleu(hypotheses, [references]).score > 30
