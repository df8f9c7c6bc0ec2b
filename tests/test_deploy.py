"""`nmt-tie export` to CTranslate2 and translation through the export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import prepare_small, run_cli, write_lines
from test_model import tiny_config

from nmt_tie.checkpoint import model_payload, save_atomic, vocab_payload
from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.errors import UserError
from nmt_tie.model.seq2seq import build_model, configure_for_data
from nmt_tie.report import count_unique, mode_config
from nmt_tie.training.trainer import Trainer
from nmt_tie.training.translation import TranslationTask
from nmt_tie.translate import SearchOptions, Translator

ctranslate2 = pytest.importorskip("ctranslate2")

from nmt_tie.deploy import ExportedTranslator, export_ctranslate2, export_sizes  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy")
    return {
        "joint": prepare_small(small_corpus, root / "joint"),
        "separate": prepare_small(small_corpus, root / "separate", joint=False),
    }


def random_checkpoint(path: Path, data: Path, seed: int = 0, **config) -> tuple[Path, torch.nn.Module]:
    """A model whose every parameter is random (layer norms, biases and P included), so that a
    weight mapped to the wrong place changes the output."""
    data = PreparedData(data)
    model = build_model(configure_for_data(tiny_config("transformer", **config), data))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.3
            param.copy_(noise + (1.0 if name.endswith("norm.weight") else 0.0))
            if "matrices" in name:
                param[PAD_ID] = 0.0
    vocab = vocab_payload(data.processor("src"), data.processor("tgt"), data.joint)
    save_atomic(model_payload(model, model.config, vocab), path)
    return path, model.eval()


VARIANTS = {
    "none-pre-joint": dict(tie="none", data="joint"),
    "decoder-post-separate": dict(tie="decoder", norm="post", data="separate"),
    "src-tgt-pre": dict(tie="src-tgt", data="joint"),
    "all-post": dict(tie="all", norm="post", data="joint"),
    "all-pre-projection": dict(tie="all", projection_reg=0.01, data="joint"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_computes_the_same_log_probabilities(variant, prepared, tmp_path, small_corpus):
    settings = dict(VARIANTS[variant])
    data = prepared[settings.pop("data")]
    checkpoint, model = random_checkpoint(tmp_path / "model.pt", data, **settings)
    export_ctranslate2(checkpoint, tmp_path / "export")
    engine = ctranslate2.Translator(str(tmp_path / "export"), intra_threads=1)
    src_proc, tgt_proc = PreparedData(data).processor("src"), PreparedData(data).processor("tgt")
    sources = src_proc.encode(_lines(small_corpus, "en"))
    targets = tgt_proc.encode(_lines(small_corpus, "de"))
    scored = engine.score_batch([src_proc.pieces(s) for s in sources], [tgt_proc.pieces(t) for t in targets])
    for src_ids, tgt_ids, result in zip(sources, targets, scored, strict=True):
        src = torch.tensor([src_ids + [EOS_ID]])
        tgt_in = torch.tensor([[BOS_ID] + tgt_ids])
        with torch.no_grad():
            logits = model(src, tgt_in).float()
        # The export never generates PAD or BOS (as nmt-tie's search): the same mask here.
        logits[..., [PAD_ID, BOS_ID]] = -torch.inf
        expected = torch.log_softmax(logits, -1)[0].gather(1, torch.tensor([tgt_ids + [EOS_ID]]).T)
        assert result.tokens == [*tgt_proc.pieces(tgt_ids), "</s>"]
        assert torch.tensor(result.log_probs) == pytest.approx(expected.squeeze(1), abs=2e-3)


def _lines(small_corpus: Path, lang: str) -> list[str]:
    return (small_corpus / f"valid.{lang}").read_text().splitlines()[:8]


@pytest.mark.parametrize("tie", ["none", "all"])
def test_a_tied_matrix_is_stored_once_and_int8_is_a_quarter(tie, prepared, tmp_path):
    checkpoint, model = random_checkpoint(tmp_path / "model.pt", prepared["joint"], tie=tie)
    export_ctranslate2(checkpoint, tmp_path / "fp32")
    export_ctranslate2(checkpoint, tmp_path / "int8", quantization="int8")
    matrix = model.embeddings.weight("output").numel()
    positions = 1024 * model.config.emb_dim  # one position table, shared by encoder and decoder
    stored = (export_sizes(tmp_path / "fp32")["model_bin_bytes"]) / 4 - positions
    unique = count_unique(model)
    # what is stored: the unique parameters (tied roles once), not one matrix per role
    assert unique <= stored < unique + matrix / 2
    if tie == "all":
        assert stored < count_unique(build_model(tiny_config("transformer", tie="none", **_sizes(model))))
    # int8 weights take a quarter (plus scales); the position table stays float32
    int8 = export_sizes(tmp_path / "int8")["model_bin_bytes"] - 4 * positions
    assert int8 < 0.4 * (export_sizes(tmp_path / "fp32")["model_bin_bytes"] - 4 * positions)
    metadata = json.loads((tmp_path / "int8" / "nmt_tie.json").read_text())
    assert metadata["tie"] == tie and metadata["quantization"] == "int8"
    assert len(metadata["source_checkpoint_sha256"]) == 64
    assert (tmp_path / "int8" / "sentencepiece.model").read_bytes() == PreparedData(
        prepared["joint"]
    ).spm_model("en")


def _sizes(model) -> dict:
    config = model.config
    return dict(src_vocab_size=config.src_vocab_size, tgt_vocab_size=config.tgt_vocab_size, shared_vocab=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared) -> Path:
    """A small Transformer trained for a minute's fraction: peaked enough for search to matter."""
    from test_train import write_config

    from nmt_tie.config import load_config

    root = tmp_path_factory.mktemp("trained")
    config = write_config(
        root / "c.yaml",
        prepared["joint"],
        root / "run",
        emb_dim=64,
        ffn_dim=128,
        heads=4,
        max_updates=120,
        valid_every=1000,
        warmup=30,
    )
    Trainer(TranslationTask, *load_config(config), log=lambda m: None).run()
    return root / "run" / "last.pt"


@pytest.mark.parametrize("beam", [1, 4])
def test_export_finds_the_same_translations_as_pytorch(beam, trained, small_corpus, tmp_path):
    export_ctranslate2(trained, tmp_path / "export")
    lines = (small_corpus / "valid.en").read_text().splitlines()[:150]
    options = SearchOptions(beam=beam)
    torch.set_num_threads(1)
    ours = Translator.from_checkpoints([trained], options).translate(lines)
    theirs = ExportedTranslator(tmp_path / "export", options, threads=1).translate(lines)
    same = sum(a[0][0] == b[0][0] for a, b in zip(ours, theirs, strict=True))
    if beam == 1:
        assert same == len(lines)
        return
    # CTranslate2 ends a beam search by other rules (fairseq's: `beam` finished hypotheses);
    # on this barely trained model, with its repetitions and near-ties, ~90% agree (on a
    # Multi30k model, 99%: recipes/benchmarks/translate_speed.py).
    assert same >= 0.8 * len(lines)
    # The same length-normalized scores where the hypotheses agree, but for those cut at the
    # length limit (ended by a forced EOS here, cut after the search there).
    equal_scores = sum(
        a[0][1] == pytest.approx(b[0][1], abs=2e-3)
        for a, b in zip(ours, theirs, strict=True)
        if a[0][0] == b[0][0]
    )
    assert equal_scores >= 0.9 * same


def test_translate_through_an_export_from_the_command_line(trained, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "export", str(trained), "--out", str(tmp_path / "int8"), "--quantization", "int8"
    )
    assert code == 0 and "model.bin" in out
    lines = ["A dog runs on the beach.", "", "Two men are talking.", "word " * 400]
    write_lines(tmp_path / "in.en", lines)
    code, stdout, err = run_cli(
        capsys,
        "translate",
        "-c",
        str(tmp_path / "int8"),
        "-i",
        str(tmp_path / "in.en"),
        "--max-src-len",
        "50",
    )
    assert code == 0
    out_lines = stdout.split("\n")
    assert len(out_lines) == len(lines) + 1 and out_lines[1] == "" and out_lines[0]
    assert "in.en:4:" in err and "truncated to 50" in err
    code, stdout, _ = run_cli(
        capsys, "translate", "-c", str(tmp_path / "int8"), "-i", str(tmp_path / "in.en"), "--nbest", "3"
    )
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert [r[0] for r in rows if r[0] == "1"] == ["1"] * 3
    # translating through an export never loads PyTorch
    script = (
        "import sys; from nmt_tie.cli import main; "
        f"main(['translate', '-c', {str(tmp_path / 'int8')!r}, '-i', {str(tmp_path / 'in.en')!r}, "
        f"'-o', {str(tmp_path / 'out.de')!r}]); assert 'torch' not in sys.modules, 'torch loaded'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (tmp_path / "out.de").read_text().split("\n")[0] == out_lines[0]
    code, stdout, _ = run_cli(capsys, "params", str(tmp_path / "int8"), "--json")
    summary = json.loads(stdout)
    assert summary["export"]["quantization"] == "int8"
    assert summary["export"]["model_bin_bytes"] < 0.45 * trained.stat().st_size
    shipped = summary["export"]["model_bin_bytes"] / (4 * summary["untied_params"])
    assert summary["export"]["fraction_of_untied_fp32"] == pytest.approx(shipped, abs=1e-4)
    # an existing directory is kept unless --force
    code, _, err = run_cli(capsys, "export", str(trained), "--out", str(tmp_path / "int8"))
    assert code == 2 and "--force" in err
    # and --force replaces only an earlier export: never the run directory holding the checkpoint
    code, _, err = run_cli(capsys, "export", str(trained), "--out", str(trained.parent), "--force")
    assert code == 2 and "is not an nmt-tie export" in err and trained.is_file()


def test_exports_refuse_what_ctranslate2_cannot_do(prepared, tmp_path, capsys, monkeypatch):
    rnn = tmp_path / "rnn.pt"
    data = PreparedData(prepared["joint"])
    model = build_model(configure_for_data(tiny_config("rnn"), data))
    save_atomic(
        model_payload(model, model.config, vocab_payload(data.processor("src"), data.processor("tgt"), True)),
        rnn,
    )
    code, _, err = run_cli(capsys, "export", str(rnn), "--out", str(tmp_path / "x"))
    assert code == 2 and "RNN" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()

    checkpoint, _ = random_checkpoint(tmp_path / "t.pt", prepared["joint"])
    export_ctranslate2(checkpoint, tmp_path / "export")
    with pytest.raises(UserError, match="gnmt needs the PyTorch checkpoint"):
        ExportedTranslator(tmp_path / "export", SearchOptions(length_norm="gnmt"))
    code, _, err = run_cli(
        capsys, "translate", "-c", str(tmp_path / "export"), "-c", str(checkpoint), "-i", "x"
    )
    assert code == 2 and "no ensembles" in err
    for device in ("bogus", "cuda:x"):
        with pytest.raises(UserError, match=f"device '{device}': give auto, cpu, cuda or cuda:N"):
            ExportedTranslator(tmp_path / "export", device=device)
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    with pytest.raises(UserError, match="device cuda: CUDA is not available here"):
        ExportedTranslator(tmp_path / "export", device="cuda")

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if not installed
    code, _, err = run_cli(capsys, "export", str(checkpoint), "--out", str(tmp_path / "y"))
    assert code == 2 and "pip install 'nmt-tie[ctranslate2]'" in err


def test_an_export_asked_for_a_precision_the_device_lacks_runs_fp32(prepared, tmp_path, monkeypatch):
    import ctranslate2

    checkpoint, _ = random_checkpoint(tmp_path / "t.pt", prepared["joint"])
    export_ctranslate2(checkpoint, tmp_path / "export")
    # as on a CPU without native bf16 (CTranslate2 would refuse int8_bfloat16 with a traceback)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda *a: {"float32", "int8_float32"})
    warnings = []
    translator = ExportedTranslator(tmp_path / "export", dtype="bf16", threads=1, warn=warnings.append)
    assert translator.engine.compute_type == "float32"
    assert len(warnings) == 1 and "no efficient bfloat16" in warnings[0] and "running float32" in warnings[0]
    warnings.clear()
    ExportedTranslator(tmp_path / "export", dtype="fp32", threads=1, warn=warnings.append)
    assert warnings == []


def test_compare_reports_the_shipped_size_of_a_runs_export(trained, capsys):
    from nmt_tie.compare import compare

    run_dir = trained.parent
    export_ctranslate2(trained, run_dir / "export-int8", quantization="int8", force=True)
    export_ctranslate2(trained, run_dir / "export-float32", force=True)
    table = compare([run_dir])
    header, _, row = table.splitlines()[:3]
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))
    int8 = (run_dir / "export-int8" / "model.bin").stat().st_size
    assert cells["shipped MB"] == f"{int8 / 1e6:.1f} (int8)"  # the smallest export is what ships
    untied = count_unique(build_model(mode_config(_model_of(trained).config, "none")))
    assert cells["of untied fp32"] == f"{int8 / (4 * untied):.1%}"


def _model_of(checkpoint: Path):
    from nmt_tie.checkpoint import load_checkpoint, load_model

    return load_model(load_checkpoint(checkpoint))


def test_a_shorter_position_table_is_smaller_and_translates_the_same(trained, small_corpus, tmp_path):
    export_ctranslate2(trained, tmp_path / "1024", quantization="int8")
    export_ctranslate2(trained, tmp_path / "512", quantization="int8", max_positions=512)
    width = torch.load(trained, weights_only=True)["model_config"]["emb_dim"]
    saved = (
        export_sizes(tmp_path / "1024")["model_bin_bytes"] - export_sizes(tmp_path / "512")["model_bin_bytes"]
    )
    assert saved == 512 * width * 4  # float32 rows, whatever the quantization
    lines = (small_corpus / "valid.en").read_text().splitlines()[:20]
    full = ExportedTranslator(tmp_path / "1024", threads=1).translate(lines)
    short = ExportedTranslator(tmp_path / "512", threads=1).translate(lines)
    assert [h[0][0] for h in full] == [h[0][0] for h in short]
    with pytest.raises(UserError, match="needs 400"):
        export_ctranslate2(trained, tmp_path / "100", max_positions=100)
    with pytest.raises(UserError, match="holds positions for 512 tokens; use at most 511"):
        ExportedTranslator(tmp_path / "512", SearchOptions(max_src_len=600))


def test_a_vocabulary_map_restricts_the_output_layer_of_an_export(trained, small_corpus, tmp_path):
    """vmap.txt in an export (recipes/distill/shortlist.py writes them): CTranslate2 only
    considers its candidates. Every piece allowed: the same translations; only a few: other ones,
    made of those pieces only."""
    import shutil

    export_ctranslate2(trained, tmp_path / "plain")
    lines = (small_corpus / "valid.en").read_text().splitlines()[:20]
    plain = ExportedTranslator(tmp_path / "plain", threads=1)
    assert not plain.vocabulary_map
    expected = [h[0][0] for h in plain.translate(lines)]
    pieces = json.loads((tmp_path / "plain" / "shared_vocabulary.json").read_text())
    for name, allowed in (("all", pieces[4:]), ("few", pieces[4:40])):
        shutil.copytree(tmp_path / "plain", tmp_path / name)
        (tmp_path / name / "vmap.txt").write_text("\t" + " ".join(allowed) + "\n", encoding="utf-8")
        restricted = ExportedTranslator(tmp_path / name, threads=1)
        assert restricted.vocabulary_map
        hypotheses = restricted.translate_ids(restricted.src.encode(lines))
        if name == "all":
            assert [restricted.tgt.decode(h[0].tokens) for h in hypotheses] == expected
        else:
            allowed_ids = {restricted.tgt.vocab.index[p] for p in allowed}
            assert all(set(h[0].tokens) <= allowed_ids for h in hypotheses)
