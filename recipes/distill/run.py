"""Distillation recipe (issue 42): the smallest model that translates as well, shipped.

Sequence-level knowledge distillation (Kim & Rush 2016), as Firefox's offline translation
models are made: a teacher translates the training set with beam search, a small three-way
tied student (narrow, a deep encoder and one decoder layer) learns from those translations,
and the student ships as an int8 CTranslate2 export. Every step is an `nmt-tie` command,
printed before it runs; rerunning resumes unfinished training and skips finished steps.

    python recipes/distill/run.py                                # Multi30k En-De, both students
    python recipes/distill/run.py --teacher A.pt --teacher B.pt  # an ensemble of teachers
    python recipes/distill/run.py --students 4-1 --with-original threads=1

1. teacher: `--teacher CKPT` (repeat it for an ensemble), or the Multi30k recipe's three-way
   tied Transformer trained to convergence (dropout 0.3, its best setting by validation) and
   averaged, made by recipes/multi30k/run.py in RUNS/teacher;
2. `nmt-tie translate` of train.en with the teacher (beam 5): one output line per training
   line, RUNS/corpus/train.de (with `--with-original`, the original pairs are appended:
   twice the lines, the source side repeated);
3. `nmt-tie prepare` of the distilled corpus (joint BPE, `--vocab-size`, 4,000 by default:
   a smaller vocabulary is a smaller matrix); validation and test keep their real references;
4. `nmt-tie train` of each student (student-ENC-DEC.yaml) to convergence on validation BLEU;
5. the average of the checkpoints nearest the best, translated and scored on test2016 (beam
   5), exported to CTranslate2 int8 with a position table of 512 rows, translated and scored
   again through the export;
6. decoding speed of the shipped student and of the untied fp32 checkpoint (`--untied CKPT`,
   the baseline) in one sitting (recipes/benchmarks/translate_speed.py's measurement: sentences/s
   of test2016 through nmt-tie's translators, 2 threads, beam 5 and greedy), and a summary per
   student in recipes/multi30k/results/distill/<name>.json (`--results`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
REPO = RECIPE.parents[1]
sys.path.insert(0, str(REPO))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


multi30k = _load(REPO / "recipes" / "multi30k" / "run.py")  # its steps: run, translate, average, export
run, up_to_date = multi30k.run, multi30k.up_to_date

from nmt_tie.artifacts import wrong_kind  # noqa: E402
from nmt_tie.data.locations import data_root  # noqa: E402
from nmt_tie.data.text import read_lines, split_file  # noqa: E402
from nmt_tie.errors import UserError  # noqa: E402

TEST_SET = multi30k.TEST_SET
STUDENTS = ("6-1", "4-1")


def teacher_checkpoints(args) -> list[Path]:
    """The teachers given, or the Multi30k recipe's converged three-way tied model (trained
    here, or found done) and the average of its checkpoints nearest the best."""
    if args.teacher:
        for teacher in args.teacher:
            if not teacher.is_file():
                missing = f"no such checkpoint: {teacher}"
                raise UserError(f"--teacher: {wrong_kind(teacher, 'a checkpoint') or missing}")
        return args.teacher
    runs = args.runs / "teacher"
    command = [
        sys.executable,
        str(REPO / "recipes" / "multi30k" / "run.py"),
        "--pair",
        "en-de",
        "--ties",
        "all",
    ]
    command += ["--converge", "--patience", "3", "--runs", str(runs), "--export", "none", "dropout=0.3"]
    print("$ " + " ".join(command[1:]), flush=True)
    import subprocess

    if subprocess.run(command).returncode != 0:
        sys.exit(1)
    return [runs / "en-de" / "transformer-all-seed1" / "averaged.pt"]


def line_count(path: Path) -> int:
    return sum(1 for _ in read_lines(path))


def distilled_corpus(args, teachers: list[Path]) -> Path:
    """RUNS/corpus/train.{en,de}: the training sources and the teachers' translations, one line
    for each training line (then the original pairs, with --with-original)."""
    source = split_file(args.multi30k / "train", "en")
    corpus = args.runs / f"corpus-{args.variant}"
    corpus.mkdir(parents=True, exist_ok=True)
    translations = args.runs / "teacher.de"
    if not all(up_to_date(translations, teacher) for teacher in teachers):
        teacher_flags = [flag for teacher in teachers for flag in ("-c", str(teacher))]
        run("translate", *teacher_flags, "-i", str(source), "-o", str(translations), "--beam", str(args.beam))
    else:
        print(f"{translations} is up to date: not translating again", flush=True)
    sources = list(read_lines(source))
    targets = list(read_lines(translations))
    if len(targets) != len(sources):  # a translation cut short (killed): done again next time
        translations.unlink()
        raise UserError(
            f"{translations} has {len(targets)} lines for {len(sources)} sources; rerun to redo it"
        )
    if args.with_original:
        sources += sources
        targets += list(read_lines(split_file(args.multi30k / "train", "de")))
    for lang, lines in (("en", sources), ("de", targets)):
        path = corpus / f"train.{lang}"
        text = "".join(line + "\n" for line in lines)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")  # rewritten only when it changes (prepare then redoes)
    return corpus / "train"


def teacher_score(teacher: Path) -> str:
    """The teacher's test2016 BLEU, where its run directory holds the score of that checkpoint."""
    name = TEST_SET if teacher.stem == "best" else f"{TEST_SET}.{teacher.stem}"
    score_file = teacher.parent / f"{name}.score.json"
    if not score_file.is_file():
        return ""
    score = json.loads(score_file.read_text())["bleu"]
    return f", {score['score']:.2f} BLEU on {TEST_SET} (`{score['signature']}`)"


def card_notes(args, teachers: list[Path]) -> str:
    """What the export's model card says of the training data (model_card reads card.md)."""
    described = "; ".join(f"`{teacher}`{teacher_score(teacher)}" for teacher in teachers)
    if len(teachers) > 1:
        described = f"an ensemble of {len(teachers)} teachers: {described}"
    original = ", followed by the original pairs" if args.with_original else ""
    return (
        "Sequence-level knowledge distillation (Kim & Rush 2016), nmt-tie's recipes/distill: the "
        f"training targets are the teacher's translations of the training sources ({described}; "
        f"beam {args.beam}){original}. Validation and test use the real references.\n"
    )


def student_runs(args, data: Path, teachers: list[Path]) -> list[Path]:
    run_dirs = []
    notes = card_notes(args, teachers)  # the same for every student
    for student in args.students:
        for seed in args.seeds:
            run_dir = args.runs / args.variant / f"student-{student}-seed{seed}"
            run("train", str(RECIPE / f"student-{student}.yaml"), f"data={data}", f"save_dir={run_dir}",
                f"seed={seed}", *args.overrides)  # fmt: skip
            if not (run_dir / "card.md").is_file() or (run_dir / "card.md").read_text() != notes:
                (run_dir / "card.md").write_text(notes, encoding="utf-8")
            averaged = multi30k.average_around_best(run_dir, args.average)
            for name, checkpoint in ((TEST_SET, run_dir / "best.pt"), (f"{TEST_SET}.averaged", averaged)):
                multi30k.translate_and_score(checkpoint, run_dir, name, args.multi30k, "en", "de", args)
            shipped = run_dir / "export-int8"
            if not up_to_date(shipped / "model.bin", averaged):
                run("export", str(averaged), "--out", str(shipped), "--quantization", "int8",
                    "--max-positions", str(args.max_positions), "--force")  # fmt: skip
            multi30k.translate_and_score(
                shipped, run_dir, f"{TEST_SET}.export-int8", args.multi30k, "en", "de", args
            )
            run_dirs.append(run_dir)
    return run_dirs


def shipped_bytes(export: Path) -> int:
    """Everything `nmt-tie translate -c DIR` needs: weights, vocabulary, SentencePiece model."""
    return sum(path.stat().st_size for path in export.iterdir() if path.is_file())


def summarize(args, run_dirs: list[Path]) -> None:
    """Speed of each shipped student and of the untied fp32 checkpoint, in one sitting; one JSON
    summary per student."""
    speed = _load(REPO / "recipes" / "benchmarks" / "translate_speed.py")
    n = line_count(split_file(args.multi30k / TEST_SET, "en"))

    def sentences_per_s(engine: str, model: Path, beam: int) -> float:
        row = speed.run_row(engine, str(model), beam, 4096, args.speed_threads, "cpu")
        return n / row["seconds"]

    untied = {}
    if args.untied:
        untied = {
            "untied_fp32_bytes": args.untied.stat().st_size,
            "untied_bleu": args.untied_bleu,
            "untied_sentences_per_s": sentences_per_s("pytorch-fp32", args.untied, 5),
            "untied_sentences_per_s_greedy": sentences_per_s("pytorch-fp32", args.untied, 1),
        }
    args.results.mkdir(parents=True, exist_ok=True)
    for run_dir in run_dirs:
        shipped = run_dir / "export-int8"
        score = json.loads((run_dir / f"{TEST_SET}.export-int8.score.json").read_text())
        summary = {
            "name": f"{args.variant}-{run_dir.name}",
            "corpus": args.variant,
            "shipped": "CTranslate2 int8 export (model.bin, vocabulary, SentencePiece model)",
            "shipped_bytes": shipped_bytes(shipped),
            "bleu": score["bleu"]["score"],
            "chrf": score["chrf"]["score"],
            "bleu_signature": score["bleu"]["signature"],
            "sentences_per_s": sentences_per_s("export-int8", shipped, 5),
            "sentences_per_s_greedy": sentences_per_s("export-int8", shipped, 1),
            "speed_threads": args.speed_threads,
            **untied,
        }
        if untied:
            summary["share_of_untied_bytes"] = round(
                summary["shipped_bytes"] / untied["untied_fp32_bytes"], 4
            )
            summary["speedup"] = round(summary["sentences_per_s"] / untied["untied_sentences_per_s"], 2)
        (args.results / f"{summary['name']}.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, action="append", help="teacher checkpoint (repeat: ensemble)")
    parser.add_argument("--students", type=lambda s: s.split(","), default=list(STUDENTS),
                        help=f"student-ENC-DEC.yaml shapes (default {','.join(STUDENTS)})")  # fmt: skip
    parser.add_argument("--seeds", type=multi30k.seed_range, default=[1], help="N or A-B, as multi30k/run.py")
    parser.add_argument(
        "--with-original", action="store_true", help="append the original pairs to the corpus"
    )
    parser.add_argument("--vocab-size", type=int, default=4000, help="the students' joint BPE (4000)")
    parser.add_argument("--max-positions", type=int, default=512, help="position rows of the export (512)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=1.0)
    parser.add_argument("--average", type=int, default=5, help="checkpoints averaged around the best")
    parser.add_argument(
        "--untied", type=Path, help="the untied fp32 checkpoint the students are measured against"
    )
    parser.add_argument(
        "--untied-bleu",
        type=float,
        default=36.38,
        help="its test2016 BLEU (default: the mean of three seeds' best.pt, README Results)",
    )
    parser.add_argument("--speed-threads", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=Path("runs/distill"))
    parser.add_argument(
        "--corpus", type=Path, help="Multi30k's directory: train, val, test_2016_flickr (default: the data's)"
    )
    parser.add_argument("--results", type=Path, default=REPO / "recipes" / "multi30k" / "results" / "distill")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for the students")
    args = parser.parse_args()
    for student in args.students:
        if not (RECIPE / f"student-{student}.yaml").is_file():
            parser.error(f"--students: no student-{student}.yaml in {RECIPE}")
    multi30k.check_overrides(parser, [RECIPE / f"student-{s}.yaml" for s in args.students], args.overrides)
    args.multi30k = args.corpus or data_root() / "multi30k"
    # the corpus variant names its corpus, prepared data and student runs: both can coexist
    args.variant = "distilled+original" if args.with_original else "distilled"
    teachers = teacher_checkpoints(args)
    train = distilled_corpus(args, teachers)
    data = args.runs / f"data-{args.variant}"
    splits = [
        "--train",
        str(train),
        "--valid",
        str(args.multi30k / "val"),
        "--test",
        str(args.multi30k / TEST_SET),
    ]
    run(
        "prepare",
        "--src",
        "en",
        "--tgt",
        "de",
        *splits,
        "--out",
        str(data),
        "--vocab-size",
        str(args.vocab_size),
    )
    run_dirs = student_runs(args, data, teachers)
    summarize(args, run_dirs)


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # one line, as nmt-tie's own commands say it
        print(f"distill: error: {err}", file=sys.stderr)
        sys.exit(2)
