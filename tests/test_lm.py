"""Language models (the paper's section 5) and embedding analysis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, write_lines

from nmt_tie.checkpoint import load_checkpoint
from nmt_tie.cli import main
from nmt_tie.config import TrainConfig, load_config
from nmt_tie.data.text import read_lines
from nmt_tie.errors import UserError
from nmt_tie.model.lstm_lm import LMConfig, LSTMLanguageModel
from nmt_tie.report import count_unique
from nmt_tie.training.distributed import DistInfo
from nmt_tie.training.language_model import LanguageModelTask, LMDataConfig, WordVocabulary, batchify
from nmt_tie.training.trainer import Trainer
from nmt_tie.wordvectors import embedding_matrix, rank, similarity_score, spearman

PTB_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ptb"
PAPER_SIZES = {("none", 0.0): 4.65e6, ("all", 0.0): 2.65e6, ("none", 0.15): 4.69e6, ("all", 0.15): 2.69e6}


@pytest.mark.parametrize("tie, reg", list(PAPER_SIZES))
def test_small_ptb_models_have_the_papers_sizes(tie, reg):
    model = LSTMLanguageModel(LMConfig(tie=tie, projection_reg=reg, vocab_size=10000))
    assert abs(count_unique(model) - PAPER_SIZES[tie, reg]) / PAPER_SIZES[tie, reg] < 0.01
    matrices = dict(model.embeddings.matrices.items())
    if tie == "all":
        assert len(matrices) == 1
        assert model.embeddings.weight("decoder_input") is model.embeddings.weight("output")
    else:
        assert len(matrices) == 2
    assert (model.embeddings.projection is not None) == (reg > 0)


def test_projection_starts_as_identity_or_as_the_authors_uniform_init_with_bias():
    def model(**kw):
        torch.manual_seed(0)
        return LSTMLanguageModel(LMConfig(tie="all", vocab_size=50, emb_dim=8, hidden_dim=8, **kw))

    identity = model(projection_reg=0.01)
    assert torch.equal(identity.embeddings.projection, torch.eye(8))
    assert identity.embeddings.projection_bias is None
    authors = model(projection_reg=0.01, projection_init="uniform", projection_bias=True)
    P, p = authors.embeddings.projection, authors.embeddings.projection_bias
    assert not torch.equal(P, torch.eye(8)) and P.abs().max() <= 0.1 and p.abs().max() <= 0.1
    assert count_unique(authors) == count_unique(identity) + 8
    # the bias enters the logits: h -> (h P + p) E^T + b
    hidden = torch.randn(3, 8)
    expected = (hidden @ P + p) @ authors.embeddings.weight("output").T + authors.embeddings.output_bias
    torch.testing.assert_close(authors.embeddings.logits(hidden), expected)
    with pytest.raises(UserError, match="projection_init"):
        model(projection_reg=0.01, projection_init="orthogonal")


@pytest.mark.parametrize("tie", ["none", "all"])
def test_every_word_id_zero_included_learns_its_input_embedding(tie):
    # A language model has no padding: id 0 is its most frequent word ("the" in PTB).
    torch.manual_seed(0)
    model = LSTMLanguageModel(LMConfig(tie=tie, vocab_size=20, emb_dim=8, hidden_dim=8))
    assert model.embeddings.weight("decoder_input")[0].abs().sum() > 0
    tokens = torch.tensor([[0, 5, 0, 7]])
    embedded = model.embeddings.embed("decoder_input", tokens)
    embedded.sum().backward()
    assert model.embeddings.weight("decoder_input").grad[0].abs().sum() > 0


def test_lstm_biases_start_at_zero_as_in_the_tensorflow_code_or_uniform():
    def biases(init: str) -> list[torch.Tensor]:
        model = LSTMLanguageModel(LMConfig(vocab_size=20, emb_dim=8, hidden_dim=8, lstm_bias_init=init))
        return [p for name, p in model.lstm.named_parameters() if name.startswith("bias")]

    assert len(biases("zero")) == 4 and all(not b.any() for b in biases("zero"))
    assert all(b.any() and b.abs().max() <= 0.1 for b in biases("uniform"))
    with pytest.raises(UserError, match="lstm_bias_init"):
        biases("ones")


def test_tying_needs_equal_embedding_and_hidden_sizes():
    with pytest.raises(UserError, match="emb_dim == hidden_dim"):
        LSTMLanguageModel(LMConfig(tie="all", emb_dim=100, hidden_dim=200, vocab_size=50))
    assert count_unique(LSTMLanguageModel(LMConfig(tie="none", emb_dim=100, hidden_dim=200, vocab_size=50)))


@pytest.fixture(scope="module")
def ptb_slice(tmp_path_factory, corpora) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ptb")
    files = {}
    for split, n in (("train", 2000), ("valid", 200), ("test", 200)):
        lines = list(read_lines(corpora / "ptb" / f"ptb.{split}.txt.gz"))[:n]
        files[split] = write_lines(root / f"{split}.txt", lines)
    return files


def lm_config(tmp_path: Path, ptb_slice: dict, **overrides) -> Path:
    values = {
        "train_text": str(ptb_slice["train"]),
        "valid_text": str(ptb_slice["valid"]),
        "tie": "all",
        "emb_dim": 48,
        "hidden_dim": 48,
        "layers": 2,
        "bptt": 20,
        "batch_size": 20,
        "optimizer": "sgd",
        "lr": 1.0,
        "schedule": "epoch_decay",
        "lr_decay": 0.5,
        "decay_start": 1,
        "clip_norm": 5.0,
        "label_smoothing": 0.0,
        "max_epochs": 2,
        "valid_every": 0,
        "valid_metric": "ppl",
        "save_dir": str(tmp_path / "run"),
        "log_every": 10,
        "threads": 1,
        **overrides,
    }
    path = tmp_path / f"{Path(values['save_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def make_trainer(config: Path) -> Trainer:
    model_cfg, train_cfg, data_cfg = load_config(config, [], (LMConfig, TrainConfig, LMDataConfig))
    return Trainer(partial(LanguageModelTask, data_cfg=data_cfg), model_cfg, train_cfg, log=lambda m: None)


def test_the_state_is_carried_across_windows_and_detached(tmp_path, ptb_slice):
    model_cfg, train_cfg, data_cfg = load_config(
        lm_config(tmp_path, ptb_slice), [], (LMConfig, TrainConfig, LMDataConfig)
    )
    task = LanguageModelTask(model_cfg, train_cfg, DistInfo(), torch.device("cpu"), data_cfg)
    model = task.build_model()
    first, second = task.next_batch(), task.next_batch()
    task.loss(model, first)
    h, c = task.state
    assert not h.requires_grad and h.grad_fn is None and c.grad_fn is None
    carried = (h.clone(), c.clone())
    loss, _, _ = task.loss(model, second)
    loss.backward()  # the graph ends at the window border: this works without retain_graph
    # The second window continued from the first: same logits as one pass over both windows.
    with torch.no_grad():
        both = torch.cat([first[0], second[0]], dim=1)
        logits_both, _ = model(both, model.initial_state(20))
        logits_second, _ = model(second[0], carried)
    torch.testing.assert_close(logits_second, logits_both[:, first[0].size(1) :], atol=1e-5, rtol=1e-5)


def test_a_small_lm_learns_a_ptb_slice_and_lm_eval_agrees(tmp_path, ptb_slice, capsys):
    summary = make_trainer(lm_config(tmp_path, ptb_slice)).run()
    assert summary["best"] < 450, summary  # a unigram model of PTB is near 700
    valid = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["type"] == "valid"]
    assert [r["epoch"] for r in valid] == [2, 3]  # one validation per epoch
    assert valid[1]["ppl"] < valid[0]["ppl"]
    main(
        [
            "lm",
            "eval",
            str(tmp_path / "run" / "best.pt"),
            "--text",
            str(ptb_slice["valid"]),
            "--batch-size",
            "10",
            "--bptt",
            "20",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert result["ppl"] == pytest.approx(summary["best"], rel=1e-3)


def test_lm_training_resumes_exactly(tmp_path, ptb_slice):
    config = lm_config(tmp_path, ptb_slice, valid_every=40, max_epochs=1, projection_reg=0.05)
    reference_dir = tmp_path / "reference"
    make_trainer(
        lm_config(
            tmp_path,
            ptb_slice,
            valid_every=40,
            max_epochs=1,
            projection_reg=0.05,
            save_dir=str(reference_dir),
        )
    ).run()
    trainer = make_trainer(config)

    def kill(t):
        if t.update == 55:
            raise KeyboardInterrupt

    trainer.after_update_hooks = [kill]
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    make_trainer(config).run()
    a = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    b = load_checkpoint(reference_dir / "last.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_lm_training_resumes_only_on_the_text_it_was_trained_on(tmp_path, ptb_slice):
    make_trainer(lm_config(tmp_path, ptb_slice, max_updates=3)).run()
    twice = tmp_path / "twice.txt"  # the same words, so the same vocabulary, but other text
    twice.write_text(ptb_slice["train"].read_text() * 2)
    with pytest.raises(UserError, match="was trained on other data: its training data differ"):
        make_trainer(lm_config(tmp_path, {**ptb_slice, "train": twice}, max_updates=6))
    assert make_trainer(lm_config(tmp_path, ptb_slice, max_updates=6)).update == 3


def test_a_text_too_short_for_the_streams_is_named(tmp_path, ptb_slice):
    short = write_lines(tmp_path / "short.txt", ["a b c"])
    with pytest.raises(UserError, match=f"{short}: too short for 10 streams \\(4 tokens"):
        make_trainer(lm_config(tmp_path, {**ptb_slice, "valid": short}))


def test_unknown_words_without_unk_name_the_file_and_line(tmp_path):
    write_lines(tmp_path / "train.txt", ["a b c", "a b"])
    write_lines(tmp_path / "test.txt", ["a b", "a zebra"])
    vocab = WordVocabulary.from_text(tmp_path / "train.txt")
    assert vocab.words[0] in ("<eos>", "a", "b") and len(vocab) == 4
    with pytest.raises(UserError, match=r"test.txt:2: 'zebra' is not in the vocabulary"):
        vocab.encode_file(tmp_path / "test.txt")
    assert batchify(np.arange(10), 3).shape == (3, 3)


def test_spearman_equals_scipy_on_a_hand_made_similarity_file(tmp_path):
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    words = ["cat", "dog", "car", "bus", "tree", "leaf", "sun", "moon"]
    matrix = rng.normal(size=(len(words), 5))
    pairs = [
        ("cat", "dog", 9.0),
        ("car", "bus", 8.5),
        ("tree", "leaf", 8.5),
        ("sun", "moon", 7.0),
        ("cat", "car", 1.0),
        ("dog", "sun", 2.0),
        ("bus", "leaf", 1.0),
        ("Moon", "Tree", 3.0),
        ("cat", "unicorn", 5.0),
    ]
    path = tmp_path / "sim.txt"
    path.write_text("".join(f"{a}\t{b}\t{s}\r\n" for a, b, s in pairs))
    result = similarity_score(words, matrix, path)
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    index = {w: i for i, w in enumerate(words)}
    used = [(a.lower(), b.lower(), s) for a, b, s in pairs if b != "unicorn"]
    cosines = [unit[index[a]] @ unit[index[b]] for a, b, _ in used]
    expected = spearmanr(cosines, [s for *_, s in used]).statistic
    assert result["spearman"] == pytest.approx(expected, abs=1e-4)
    assert result["pairs"] == 8 and result["skipped"] == 1
    assert list(rank(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)


def test_embeddings_command_exports_and_explains_untied_models(tmp_path, ptb_slice, capsys):
    make_trainer(lm_config(tmp_path, ptb_slice, tie="none", max_epochs=1)).run()
    ckpt = tmp_path / "run" / "best.pt"
    payload = load_checkpoint(ckpt)
    with pytest.raises(UserError, match="untied"):
        embedding_matrix(payload, "tied")
    words_in, inp = embedding_matrix(payload, "input")
    words_out, out = embedding_matrix(payload, "output")
    assert words_in == words_out and inp.shape == out.shape and not np.allclose(inp, out)
    main(
        [
            "embeddings",
            str(ckpt),
            "--which",
            "output",
            "--export",
            str(tmp_path / "vec.txt"),
            "--neighbours",
            "the",
        ]
    )
    lines = (tmp_path / "vec.txt").read_text().splitlines()
    assert lines[0] == f"{len(words_out)} 48" and len(lines) == len(words_out) + 1
    assert lines[1].split()[0] == words_out[0] and len(lines[1].split()) == 49
    assert capsys.readouterr().out.startswith("the: ")
    # The other commands know a language-model checkpoint when they see one.
    code, out, err = run_cli(capsys, "params", str(ckpt), "--json")
    assert code == 0 and json.loads(out)["params"] == count_unique(
        LSTMLanguageModel(LMConfig(tie="none", emb_dim=48, hidden_dim=48, vocab_size=len(words_out)))
    )
    code, _, err = run_cli(capsys, "translate", "-c", str(ckpt), "-i", str(ptb_slice["valid"]))
    assert code == 2 and "language-model checkpoint" in err


def test_small_ptb_recipe_configs_differ_only_in_tying_and_projection():
    configs = {}
    for variant in ("none", "all", "none-pr", "all-pr"):
        path = PTB_RECIPE / f"small-{variant}.yaml"
        load_config(path, [], (LMConfig, TrainConfig, LMDataConfig))  # every key is a valid one
        configs[variant] = yaml.safe_load(path.read_text())
    projection_keys = {"projection_reg", "projection_init", "projection_bias"}
    for variant, config in configs.items():
        differing = {
            k for k in configs["none"].keys() | config.keys() if configs["none"].get(k) != config.get(k)
        }
        assert differing <= {"tie", "save_dir"} | projection_keys, (variant, differing)
        assert config["save_dir"].endswith(f"small-{variant}")
    assert {k: configs["none-pr"][k] for k in projection_keys} == {
        k: configs["all-pr"][k] for k in projection_keys
    }
    assert configs["all-pr"]["projection_reg"] > 0 and configs["all"].get("projection_reg", 0) == 0


@pytest.mark.parametrize("tie, paper_size", [("none", 66e6), ("all", 51e6)])
def test_large_ptb_recipe_builds_the_papers_large_models(tie, paper_size):
    model_config, train_config, _ = load_config(
        PTB_RECIPE / f"large-{tie}.yaml", [], (LMConfig, TrainConfig, LMDataConfig)
    )
    assert model_config.tie == tie and model_config.hidden_dim == 1500 and model_config.dropout == 0.65
    assert train_config.max_epochs == 55
    with torch.device("meta"):  # sizes only: no memory for 66M weights
        model = LSTMLanguageModel(replace(model_config, vocab_size=10000))
    assert abs(count_unique(model) - paper_size) / paper_size < 0.01


def test_ptb_recipe_trains_scores_and_reports_each_variant(tmp_path, ptb_slice, corpora):
    data = tmp_path / "data"
    (data / "ptb").mkdir(parents=True)
    for split, path in ptb_slice.items():
        write_lines(data / "ptb" / f"ptb.{split}.txt.gz", list(read_lines(path)))
    (data / "wordsim").symlink_to(corpora / "wordsim")
    runs = tmp_path / "runs"
    small = ["emb_dim=16", "hidden_dim=16", "max_epochs=1", "threads=1", "log_every=100"]
    command = [sys.executable, str(PTB_RECIPE / "run.py"), "--variants", "none,all-pr", "--runs", str(runs)]
    env = {**os.environ, "NMT_TIE_DATA": str(data)}
    out = subprocess.run([*command, *small], env=env, capture_output=True, text=True, check=True).stdout
    results = {v: json.loads((runs / v / "results.json").read_text()) for v in ("small-none", "small-all-pr")}
    for variant, result in results.items():
        config = LMConfig(**load_checkpoint(runs / variant / "best.pt")["model_config"])
        assert result["params"] == count_unique(LSTMLanguageModel(config))
        assert 1 < result["test_ppl"] < config.vocab_size
        assert set(result["similarity"]) == {"input", "output"}
    tied, untied = results["small-all-pr"]["similarity"], results["small-none"]["similarity"]
    assert tied["input"] == tied["output"] and untied["input"] != untied["output"]
    table = (runs / "results-small.md").read_text()
    assert "| untied | " in table and "| tied + PR | " in table and table.strip() in out
    assert (runs / "results-small.png").read_bytes().startswith(b"\x89PNG")
    # a second run neither trains nor scores again; --report-only rebuilds the same table
    again = subprocess.run([*command, *small], env=env, capture_output=True, text=True, check=True).stdout
    assert again.count("is up to date: not evaluating again") == 2
    report = subprocess.run([*command, "--report-only"], env=env, capture_output=True, text=True, check=True)
    assert report.stdout.strip() == table.strip()
