"""Recipes: configs differ only in tying; `compare` reports what runs wrote; the WMT recipes'
data steps work against a local fake mirror of the official download URLs."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script, prepare_small
from test_train import write_config

from nmt_tie.compare import RunSummary, compare, comparison_table
from nmt_tie.config import load_config
from nmt_tie.data.fetch import load_manifest
from nmt_tie.data.text import read_lines
from nmt_tie.errors import UserError
from nmt_tie.training.metrics import read_log
from nmt_tie.training.trainer import Trainer
from nmt_tie.training.translation import TranslationTask

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VARIANT_SETS = [
    ("multi30k", "transformer"),
    ("multi30k", "rnn"),
    ("wmt15_en_de", "rnn"),
    ("wmt14_en_fr", "rnn"),
    ("wmt14_en_de_transformer", "transformer"),
]


@pytest.mark.parametrize("recipe, arch", VARIANT_SETS)
def test_recipe_configs_differ_only_in_the_tying_key(recipe, arch):
    configs = {}
    for tie in ("none", "decoder", "all"):
        path = RECIPES / recipe / f"{arch}-{tie}.yaml"
        configs[tie] = yaml.safe_load(path.read_text())
        load_config(path)  # every key is a valid one
        assert configs[tie]["tie"] == tie and configs[tie]["arch"] == arch
    for a, b in itertools.combinations(configs.values(), 2):
        differing = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
        assert differing == {"tie", "save_dir"}, differing
        assert a["save_dir"].replace(a["tie"], "") == b["save_dir"].replace(b["tie"], "")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_corpus) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("compare")
    data = root / "prep"
    prepare_small(small_corpus, data)
    runs = []
    for tie in ("none", "all"):
        config = write_config(root / f"{tie}.yaml", data, root / f"run-{tie}", tie=tie, max_updates=10)
        Trainer(TranslationTask, *load_config(config), log=lambda m: None).run()
        runs.append(root / f"run-{tie}")
    scores = {
        "bleu": {"score": 1.25, "signature": "x", "text": "x"},
        "chrf": {"score": 9.5, "signature": "y", "text": "y"},
    }
    (runs[1] / "test.score.json").write_text(json.dumps(scores))
    return root, runs


def test_compare_writes_a_table_and_a_plot_with_the_runs_numbers(two_runs):
    root, runs = two_runs
    table = compare(runs, root / "report.md", root / "report.png")
    assert (root / "report.md").read_text().count("| run-") == 2
    png = (root / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if "| run-" in line
    }
    header = [h.strip("| ") for h in table.splitlines()[0].split(" | ")]
    for run in runs:
        row = dict(zip(header, [c.strip("| ") for c in rows[run.name]], strict=True))
        valid = [r for r in read_log(run) if r["type"] == "valid"]
        assert float(row["valid BLEU"]) == pytest.approx(max(r["bleu"] for r in valid), abs=0.005)
        assert int(row["updates"]) == 10
        assert float(row["checkpoint MB"]) == pytest.approx((run / "best.pt").stat().st_size / 1e6, abs=0.05)
    none, tied = (dict(zip(header, [c.strip("| ") for c in rows[r.name]], strict=True)) for r in runs)
    assert none["reduction"] == "0.0%" and float(tied["reduction"].rstrip("%")) > 30
    assert int(tied["params"].replace(",", "")) < int(none["params"].replace(",", ""))
    assert tied["test BLEU"] == "1.25" and tied["test chrF"] == "9.50" and none["test BLEU"] == "-"


def test_compare_never_writes_over_what_it_reads_and_names_a_broken_log_line(two_runs, tmp_path):
    root, runs = two_runs
    for name in ("log.jsonl", "config.yaml", "best.pt", "test.score.json"):
        report = runs[1] / name
        before = report.read_bytes()
        with pytest.raises(UserError, match=f"-o {re.escape(str(report))} is also .* an input"):
            compare(runs, report)
        assert report.read_bytes() == before
    with pytest.raises(UserError, match=r"--plot .*report.txt: name a file ending in one of .*\.png"):
        compare(runs, None, tmp_path / "report.txt")
    assert not (tmp_path / "report.txt").exists()
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken)
    lines = (broken / "log.jsonl").read_text().splitlines()
    (broken / "log.jsonl").write_text("\n".join([lines[0], "| a markdown table |", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{broken / 'log.jsonl'}:2: not a JSON record")):
        compare([broken])
    (broken / "log.jsonl").write_text("\n".join([*lines, '{"type": "tra']) + "\n")  # being written
    assert len(read_log(broken)) == len(lines)


def test_compare_summarizes_seeds_as_mean_and_standard_deviation():
    def run(seed: int, bleu: float, chrf: float) -> RunSummary:
        return RunSummary(
            name=f"transformer-all-seed{seed}",
            path=Path("."),
            pair="en-de",
            arch="transformer",
            tie="all",
            seed=seed,
            params=75,
            untied_params=100,
            checkpoint_bytes=None,
            best_valid_bleu=bleu - 1,
            updates=10,
            minutes=1.0,
            valid_curve=[],
            tests={"test": {"bleu": bleu, "chrf": chrf}},
        )

    table = comparison_table([run(1, 30.0, 50.0), run(2, 32.0, 54.0), run(3, 34.0, 58.0)])
    summary = [line for line in table.splitlines() if line.startswith("| en-de")]
    expected = "| en-de | transformer | all | 3 | 75 | 25.0% | 31.00 ± 2.00 | 32.00 ± 2.00 | 54.00 ± 4.00 |"
    assert summary == [expected]


def test_a_run_validated_once_is_drawn_as_a_point(tmp_path, monkeypatch):
    import matplotlib.figure

    from nmt_tie.compare import comparison_plot

    run = RunSummary("transformer-all-seed1", Path("."), "en-de", "transformer", "all", 1, 75, 100,
                     None, 20.0, 300, 1.0, [(300, 20.0)])  # fmt: skip
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    comparison_plot([run], tmp_path / "plot.png")
    (curve,) = figures[0].axes[1].lines
    assert list(curve.get_xdata()) == [300] and curve.get_marker() == "o"


def test_runs_validated_once_show_their_training_curves(tmp_path, monkeypatch):
    """`make demo` validates each model once, at its end: the right panel then draws the
    training curves the runs logged; a run validated several times keeps its BLEU curves."""
    import matplotlib.figure

    from nmt_tie.compare import comparison_plot

    def run(tie: str, valid_curve: list) -> RunSummary:
        return RunSummary(f"transformer-{tie}-seed1", Path("."), "en-de", "transformer", tie, 1, 75, 100,
                          None, 20.0, 300, 1.0, valid_curve,
                          train_curve=[(100, 4.0), (200, 3.0), (300, 2.5)])  # fmt: skip

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    comparison_plot([run("none", [(300, 20.0)]), run("all", [(300, 21.0)])], tmp_path / "plot.png")
    right = figures[0].axes[1]
    assert right.get_ylabel().startswith("training cross-entropy")
    assert [list(line.get_ydata()) for line in right.lines] == [[4.0, 3.0, 2.5]] * 2
    comparison_plot([run("none", [(150, 15.0), (300, 20.0)]), run("all", [(300, 21.0)])], tmp_path / "p.png")
    right = figures[1].axes[1]
    assert right.get_ylabel() == "validation BLEU"
    assert [list(line.get_xdata()) for line in right.lines] == [[150, 300], [300]]


MULTI30K_RECIPE = Path(__file__).parents[1] / "recipes" / "multi30k" / "run.py"


def load_multi30k_recipe():
    """recipes/multi30k/run.py as a module (it is a script, not part of the package)."""
    return load_script(MULTI30K_RECIPE)


def test_the_demo_trains_both_ties_with_one_configuration_made_for_its_budget():
    """`make demo` (issue 40): untied and three-way tied, identical but for `tie`, the search's
    chosen short-budget configuration, one validation at the end."""
    from nmt_tie.report import count_unique, meta_model, mode_config

    multi30k_run = load_multi30k_recipe()
    assert multi30k_run.DEMO_TIES == "none,all"
    updates, overrides = multi30k_run.demo_settings()
    settings = dict(item.split("=") for item in overrides)
    assert updates == 1250 and abs(int(settings["warmup"]) - updates / 3) < 1  # a third
    assert settings["valid_every"] == "100000"  # validated once, when training ends
    configs = {
        tie: load_config(
            MULTI30K_RECIPE.parent / f"transformer-{tie}.yaml", [*overrides, "data=x", "save_dir=x"]
        )
        for tie in ("none", "all")
    }
    as_dicts = {tie: {**vars(model), **vars(train)} for tie, (model, train) in configs.items()}
    assert {k for k in as_dicts["none"] if as_dicts["none"][k] != as_dicts["all"][k]} == {"tie"}
    model = configs["all"][0]
    assert (model.enc_layers, model.dec_layers, model.ffn_dim, model.dropout) == (2, 2, 512, 0.0)
    assert configs["all"][1].schedule == "linear"  # decays to 0 at the end of the demo's budget
    sized = mode_config(model, "all", {"joint": 8000})
    tied, untied = (count_unique(meta_model(mode_config(sized, tie))) for tie in ("all", "none"))
    assert tied <= 0.65 * untied  # at least 35% fewer parameters
    # another budget keeps the warm-up at a third of it
    _, shorter = multi30k_run.demo_settings(600)
    assert "warmup=200" in shorter


def test_the_demo_configuration_has_the_tied_model_ahead_for_every_searched_seed(tmp_path, capsys):
    """The search's committed logs (results/demo-search) summarized as `--collect` does: the
    demo's candidate has three seeds or more, each with the tied model level or ahead on
    validation (greedy and beam 5), and a run short of its budget is left out of the summary."""
    import shutil

    search = load_script(MULTI30K_RECIPE.parent / "demo_search.py")
    results = search.collect(MULTI30K_RECIPE.parent / "results" / "demo-search")
    demo = results[load_multi30k_recipe().DEMO_CANDIDATE]
    seeds = sorted(demo["none"], key=int)
    assert len(seeds) >= 3
    for scores in (demo, demo["beam5"]):  # greedy (the run's validation) and beam 5
        assert sorted(scores["none"], key=int) == sorted(scores["all"], key=int) == seeds
        assert all(scores["all"][seed] >= scores["none"][seed] for seed in seeds)
    # the demo prints them under its own single run (from the committed summary.json)
    load_multi30k_recipe().print_demo_seeds()
    greedy, beam = (
        ", ".join(f"{scores['all'][s] - scores['none'][s]:+.2f}" for s in seeds)
        for scores in (demo, demo["beam5"])
    )
    out = " ".join(capsys.readouterr().out.split())
    assert f"seeds {', '.join(seeds)} (validation, greedy: untied" in out
    assert f"in each, by {greedy} BLEU greedy and {beam} with beam 5" in out
    # an unfinished run (its last validation before the budget) does not count
    copied = tmp_path / "small-1500"
    shutil.copytree(MULTI30K_RECIPE.parent / "results" / "demo-search" / "small-1500", copied)
    log = copied / "all-seed1" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"valid"' not in line))
    partial = search.collect(tmp_path)
    assert "all" not in partial["small-1500"] and "1" in partial["small-1500"]["none"]
    assert "small-1500" not in search.summary_table(partial)


CONVERGED_TABLES = RECIPES / "multi30k" / "tables.py"


def test_converged_tables_are_the_committed_runs_and_the_readme_shows_them():
    tables = load_script(CONVERGED_TABLES)
    assert tables.main(["--check"]) == 0, "results/converged/*.md differ from what runs/ gives"
    readme = (RECIPES.parent / "README.md").read_text()
    rows = [line for line in (tables.CONVERGED / "table.md").read_text().splitlines() if line.startswith("|")]
    assert rows and [row for row in rows if row not in readme] == []


def test_converged_tables_follow_a_changed_score_and_a_new_seed(tmp_path):
    import shutil

    tables = load_script(CONVERGED_TABLES)
    runs = tmp_path / "runs" / "en-de"
    for name in ("transformer-all-seed1", "transformer-all-seed2", "transformer-none-seed1"):
        shutil.copytree(tables.CONVERGED / "runs" / "en-de" / name, runs / name)
    assert tables.main(["--results", str(tmp_path)]) == 0
    assert tables.main(["--results", str(tmp_path), "--check"]) == 0

    score_file = runs / "transformer-none-seed1" / "test_2016_flickr.score.json"
    scores = json.loads(score_file.read_text())
    scores["bleu"]["score"] = 45.0
    scores["bleu"]["text"] = scores["bleu"]["text"].replace("ratio = 1.021", "ratio = 0.950")
    score_file.write_text(json.dumps(scores))
    shutil.copytree(runs / "transformer-all-seed2", runs / "transformer-all-seed3")
    config = runs / "transformer-all-seed3" / "config.yaml"
    config.write_text(config.read_text().replace("seed: 2", "seed: 3"))
    assert tables.main(["--results", str(tmp_path), "--check"]) == 1
    assert tables.main(["--results", str(tmp_path)]) == 0

    table = (tmp_path / "table.md").read_text()
    untied = next(line for line in table.splitlines() if line.startswith("| untied"))
    tied = next(line for line in table.splitlines() if line.startswith("| three-way"))
    assert "| **45.00** |" in untied and "| 0.950-1.001 |" in untied
    assert ", seed 1 |" in untied.split("|")[1] + "|"  # fewer seeds than the tied runs: said so
    assert "| 38.59 ± 0.06 |" in tied  # (38.52 + 38.63 + 38.63) / 3, sd 0.0635
    assert "(3 seeds, mean ± sd)" in table.splitlines()[0]
    assert "en-de/transformer-all-seed3" in (tmp_path / "runs.md").read_text()


def test_converge_mode_stops_early_on_the_final_search_and_keeps_checkpoints_to_average():
    import argparse

    multi30k_run = load_multi30k_recipe()
    args = argparse.Namespace(patience=5, average=4, beam=5)
    overrides = dict(item.split("=") for item in multi30k_run.converge_overrides(args))
    _, train_cfg = load_config(
        MULTI30K_RECIPE.parent / "transformer-all.yaml", list(multi30k_run.converge_overrides(args))
    )
    assert train_cfg.patience == 5 and train_cfg.valid_beam == 5  # validation BLEU = final search
    assert int(overrides["save_every"]) == train_cfg.valid_every
    assert train_cfg.keep_last >= 4 + 5  # the 4 up to best.pt survive 5 validations past it
    assert 0 < train_cfg.save_every_minutes <= 15  # a kill between validations loses little


def test_seeds_are_a_count_or_a_range():
    import argparse

    seed_range = load_multi30k_recipe().seed_range
    assert seed_range("3") == [1, 2, 3]
    assert seed_range("2-3") == [2, 3]
    assert seed_range("3-3") == [3]  # one seed alone, the others run elsewhere
    for bad in ("0", "3-2", "0-2", "x", "2-", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="A-B"):
            seed_range(bad)


def test_checkpoints_averaged_are_the_nearest_to_the_best_on_both_sides():
    multi30k_run = load_multi30k_recipe()
    around = multi30k_run.checkpoints_around
    saved = list(range(500, 4001, 500))
    # a run that peaked early and trained 3 validations past it: 2 before, 2 after
    assert around(saved, 2500, 5) == [1500, 2000, 2500, 3000, 3500]
    assert around(saved, 4000, 5) == [2000, 2500, 3000, 3500, 4000]  # the best is the last
    assert around(saved, 500, 3) == [500, 1000, 1500]
    assert around(saved, 2500, 4) == [1500, 2000, 2500, 3000]  # a tie: the earlier one
    assert around([1000], 1000, 5) == [1000]


# --- the WMT recipes' data steps against a fake mirror ---------------------------------------


def sgm(lines: list[str], setid: str) -> bytes:
    segs = "".join(f'<seg id="{i}">{line}</seg>\n' for i, line in enumerate(lines, start=1))
    head = f'<srcset setid="{setid}">\n<doc docid="d1" genre="news" origlang="en">\n'
    return (head + segs + "</doc>\n</srcset>\n").encode()


def add_archive(path: Path, members: dict[str, bytes], kind: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if kind == "tgz" else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture()
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    "recipe, corpus",
    [
        ("wmt15_en_de", "wmt15_en_de"),
        ("wmt14_en_fr", "wmt14_en_fr"),
        ("wmt14_en_de_transformer", "wmt14_en_de"),
    ],
)
def test_wmt_recipe_data_step_with_a_fake_mirror(recipe, corpus, tmp_path, mirror, corpora):
    from urllib.parse import urlparse

    from sacrebleu.dataset import DATASETS

    root, url = mirror
    manifest = load_manifest()
    entry = manifest[corpus]
    src, tgt = entry["langs"]
    # Real sentences stand in for the corpora: newstest2009-2012 as "training data".
    news = {
        lang: [
            line
            for year in (2009, 2010, 2011, 2012)
            for line in read_lines(corpora / "wmt" / f"{src}-{tgt}" / f"newstest{year}.{lang}.gz")
        ]
        for lang in (src, tgt)
    }
    downloads = entry["downloads"]
    per_archive = len(news[src]) // len(downloads)
    for i, item in enumerate(downloads):
        members = {}
        for lang in (src, tgt):
            name = entry["splits"]["train"][lang][i]
            text = "".join(x + "\n" for x in news[lang][i * per_archive : (i + 1) * per_archive]).encode()
            members[f"training/{name}"] = gzip.compress(text) if name.endswith(".gz") else text
        parsed = urlparse(item["url"])
        add_archive(root / parsed.netloc / parsed.path.lstrip("/"), members, item.get("unpack", "tgz"))
    expected_tests = {}
    for split, spec in entry["test_sets"].items():
        dataset = DATASETS[spec["sacrebleu"]]
        files = dataset.langpairs[f"{src}-{tgt}"]
        year = 2013 if split == "newstest2013" else 2014
        lines = {
            lang: list(read_lines(corpora / "wmt" / f"{src}-{tgt}" / f"newstest{year}.{lang}.gz"))[:500]
            for lang in (src, tgt)
        }
        members = {files[0]: sgm(lines[src], split), files[1]: sgm(lines[tgt], split)}
        parsed = urlparse(dataset.data[0])
        spec["md5"] = [add_archive(root / parsed.netloc / parsed.path.lstrip("/"), members, "tgz")]
        expected_tests[split] = lines
    test_manifest = tmp_path / "corpora.yaml"
    test_manifest.write_text(yaml.safe_dump(manifest))

    env = {
        **os.environ,
        "NMT_TIE_MANIFEST": str(test_manifest),
        "MIRROR": url,
        "CORPORA": str(tmp_path / "corpora"),
        "RUNS": str(tmp_path / "runs"),
        "VOCAB": "1000",
        "NMT_TIE": f"{sys.executable} -m nmt_tie",
    }
    result = subprocess.run(
        ["bash", str(RECIPES / recipe / "run.sh"), "data"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    stats = json.loads((tmp_path / "runs" / "data" / "stats.json").read_text())
    assert stats["joint"] and stats["vocab_size"][src] == 1000
    assert stats["splits"]["train"]["read"] == per_archive * len(downloads)
    assert stats["splits"]["valid"]["read"] == 500
    for split, lines in expected_tests.items():
        if split == "newstest2013":
            continue
        assert stats["splits"][split]["read"] == 500
        fetched = list(read_lines(tmp_path / "corpora" / corpus / f"{split}.{tgt}"))
        assert fetched == [" ".join(x.split()) for x in lines[tgt]]  # sacrebleu normalizes spaces


SCRIPTS = sorted(p for p in RECIPES.glob("*/*.py") if "argparse" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[f"{p.parent.name}/{p.name}" for p in SCRIPTS])
def test_every_recipe_and_benchmark_script_answers_help(script):
    # argparse formats help texts with %: a bare "%" in one made --help a TypeError traceback
    command = [sys.executable, str(script), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr


def test_recipe_scripts_refuse_bad_use_before_doing_anything(tmp_path):
    runs = tmp_path / "runs"
    argv = [sys.executable, str(RECIPES / "multi30k" / "run.py"), "--ties", "none,bogus", "--runs", str(runs)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no recipe transformer-bogus.yaml" in result.stderr
    assert "Traceback" not in result.stderr and not runs.exists()  # nothing prepared
    result = subprocess.run(["bash", str(RECIPES / "wmt.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "run a recipe's run.sh" in result.stderr
    command = ["bash", str(RECIPES / "wmt14_en_de_transformer" / "run.sh"), "eval"]
    env = {**os.environ, "RUNS": str(runs)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "transformer-none has no numbered checkpoints to" in result.stderr
    for gpus in ("abc", "0"):
        command = ["bash", str(RECIPES / "wmt15_en_de" / "run.sh"), "train"]
        env = {**os.environ, "GPUS": gpus, "RUNS": str(runs)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 2 and f"GPUS={gpus}: give the number of GPUs" in result.stderr
    # an override the configs refuse is said before the data is prepared (or, for the
    # distillation recipe, before hours of training its teacher)
    scripts = [("multi30k/run.py", "transformer-none.yaml"), ("distill/run.py", "student-6-1.yaml")]
    overrides = [("bogus=1", "unknown key 'bogus'"), ("dropout=abc", "'abc' is not a valid")]
    for (script, config), (override, message) in itertools.product(scripts, overrides):
        argv = [sys.executable, str(RECIPES / script), "--runs", str(runs), override]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and f"{config}: " in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr and not runs.exists(), result.stderr


# --- the WMT recipes end to end, on local news text ------------------------------------------


def local_news_recipe_env(corpora: Path, pair: str, tmp_path: Path, runs: Path, gpus: int) -> dict:
    """A WMT recipe's environment for a run on the first lines of the news test sets:
    newstest2009-2012 as training data, 2013 for validation, 2014 for test."""
    src, tgt = pair.split("-")
    local = tmp_path / "news"
    local.mkdir()
    for year, lines in [(2009, 300), (2010, 300), (2011, 300), (2012, 300), (2013, 40), (2014, 30)]:
        for lang in (src, tgt):
            text = itertools.islice(read_lines(corpora / "wmt" / pair / f"newstest{year}.{lang}.gz"), lines)
            name = local / (f"newstest{year}.{lang}.gz" if year < 2013 else f"newstest{year}.{lang}")
            with (gzip.open if year < 2013 else open)(name, "wt", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in text)
    return {
        **os.environ,
        "CORPUS_DIR": str(local),
        "TRAIN_SETS": "newstest2009 newstest2010 newstest2011 newstest2012",
        "TESTS": "newstest2014",
        "RUNS": str(runs),
        "VOCAB": "500",
        "NMT_TIE": f"{sys.executable} -m nmt_tie",
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "GPUS": str(gpus),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, pair, model, gpus",
    [
        ("wmt14_en_de_transformer", "en-de", "emb_dim=32 ffn_dim=64 enc_layers=1 dec_layers=1 heads=2", 2),
        ("wmt15_en_de", "en-de", "emb_dim=32 hidden_dim=32", 1),
        ("wmt14_en_fr", "en-fr", "emb_dim=32 hidden_dim=32", 1),
    ],
)
def test_a_wmt_recipe_runs_end_to_end_on_local_news_text(recipe, pair, model, gpus, tmp_path, corpora):
    """`run.sh data train eval` with CORPUS_DIR: newstest2009-2012 as training data, 2013 for
    validation, 2014 for test (their first lines, for time), a tiny model and a few updates
    as overrides; every stage as the recipe has it (its batching, length normalization,
    averaging). One process trains without a launcher, two (gloo workers here) under torchrun."""
    runs = tmp_path / "runs"
    env = local_news_recipe_env(corpora, pair, tmp_path, runs, gpus)
    env["OVERRIDES"] = f"{model} max_updates=4 valid_every=2 save_every=2 log_every=2 threads=1"
    result = subprocess.run(
        ["bash", str(RECIPES / recipe / "run.sh"), "data", "train", "eval"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    launched = result.stderr.count(f"-m torch.distributed.run --nproc_per_node {gpus} -m nmt_tie train ")
    assert launched == (3 if gpus > 1 else 0) and result.stderr.count("-m nmt_tie train ") == 3
    stats = json.loads((runs / "data" / "stats.json").read_text())
    assert stats["splits"]["train"]["read"] == 1200 and stats["splits"]["newstest2014"]["read"] == 30
    recipe_config = yaml.safe_load((RECIPES / recipe / f"{recipe_arch(recipe)}-all.yaml").read_text())
    for tie in ("none", "decoder", "all"):
        run = runs / f"{recipe_arch(recipe)}-{tie}"
        setup = next(r for r in read_log(run) if r["type"] == "setup")
        assert setup["workers"] == gpus
        assert any(note.startswith("max_tokens auto: ") for note in setup["batch_notes"])
        if recipe_config.get("global_batch_tokens"):  # about 25,000 target tokens (the data has 36,000)
            assert abs(setup["tokens_per_update"] / recipe_config["global_batch_tokens"] - 1) < 0.15
        else:  # 80 sentences: one batch of 80 (fewer in the epoch's last batches)
            assert (setup["max_sentences"], setup["update_freq"]) == (80, 1)
            assert len(setup["batch_notes"]) == 2  # max_tokens is not what limits the batch
        score = json.loads((run / "newstest2014.score.json").read_text())
        assert {"bleu", "chrf"} <= set(score)
        assert len((run / "newstest2014.hyp").read_text().splitlines()) == 30
    transformer = recipe_arch(recipe) == "transformer"
    assert ("--length-norm gnmt" in result.stderr) == transformer  # Vaswani et al.'s length penalty
    assert (runs / "transformer-all" / "averaged.pt").exists() == transformer  # the last checkpoints averaged
    report = (runs / "report.md").read_text()
    assert all(f"| {recipe_arch(recipe)}-{tie} |" in report for tie in ("none", "decoder", "all"))


def recipe_arch(recipe: str) -> str:
    return "transformer" if "transformer" in recipe else "rnn"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("gpus", [1, 2])
def test_a_signal_to_the_recipe_script_alone_reaches_training(signum, gpus, tmp_path, corpora):
    """docker stop and Kubernetes signal a container's first process only: run.sh as that
    process passes SIGTERM (and SIGINT) on, training saves and stops, run.sh exits with the
    status a requeueing scheduler reads, and rerunning resumes."""
    runs = tmp_path / "runs"
    env = local_news_recipe_env(corpora, "en-de", tmp_path, runs, gpus)
    env["TIES"] = "all"
    env["OVERRIDES"] = "emb_dim=32 hidden_dim=32 max_updates=400 valid_every=1000 log_every=1 threads=1"
    script = str(RECIPES / "wmt15_en_de" / "run.sh")
    subprocess.run(["bash", script, "data"], env=env, capture_output=True, check=True, timeout=300)
    process = subprocess.Popen(
        ["bash", script, "train"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = runs / "rnn-all"
    deadline = time.time() + 240
    while not [r for r in read_log(run_dir) if r["type"] == "train" and r["update"] >= 3]:
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signum)  # to bash alone, not to its children
    output, _ = process.communicate(timeout=120)
    saved = torch.load(run_dir / "last.pt", weights_only=True)["trainer"]["update"]
    assert 3 <= saved < 400, output
    assert f"stopped: {signal.Signals(signum).name} at update {saved}" in output
    if gpus == 1:
        assert process.returncode == 128 + signum, output  # nmt-tie's own status, through run.sh
    else:
        assert process.returncode != 0, output  # torchrun's
    env["OVERRIDES"] = env["OVERRIDES"].replace("max_updates=400", f"max_updates={saved + 2}")
    rerun = subprocess.run(["bash", script, "train"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"resuming {run_dir} from update {saved}" in rerun.stderr, rerun.stderr
