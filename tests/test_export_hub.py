"""`nmt-tie export --to huggingface` and `--to argos` (issue 41): transformers computes nmt-tie's
logits for every variant (random weights, so that a misplaced tensor shows), a tied matrix is
stored once, the tokenizer's ids are nmt-tie's, generate finds nmt-tie's beam search
translations, an Argos package installs and translates as nmt-tie does, and what cannot be
exported is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_deploy import (  # noqa: F401
    prepared,
    random_checkpoint,  # noqa: F401 (its fixtures: prepared, trained)
    trained,
)

from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.errors import UserError
from nmt_tie.translate import SearchOptions, Translator

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from nmt_tie.hf_export import export_huggingface, pegasus_keeps_separate_embeddings  # noqa: E402

# transformers 4.x: Pegasus has one embedding for encoder and decoder (the export refuses others)
SEPARATE = pegasus_keeps_separate_embeddings()

VARIANTS = [
    (norm, tie, p) for norm in ("pre", "post") for tie in ("none", "decoder", "all") for p in (0.0, 0.01)
]


def teacher_forced(model, sources: list[list[int]], targets: list[list[int]]):
    """nmt-tie's logits and the padded tensors: sources end in EOS, targets start with BOS."""
    width = max(map(len, sources)) + 1
    src = torch.tensor([s + [EOS_ID] + [PAD_ID] * (width - len(s) - 1) for s in sources])
    length = max(map(len, targets)) + 1
    tgt = torch.tensor([[BOS_ID] + t + [PAD_ID] * (length - len(t) - 1) for t in targets])
    with torch.no_grad():
        return model(src, tgt).float(), src, tgt


@pytest.mark.parametrize("norm, tie, projection", VARIANTS, ids=[f"{n}-{t}-P{p}" for n, t, p in VARIANTS])
def test_transformers_computes_nmt_ties_logits(norm, tie, projection, prepared, tmp_path, small_corpus):  # noqa: F811
    checkpoint, model = random_checkpoint(
        tmp_path / "model.pt", prepared["joint"], tie=tie, norm=norm, projection_reg=projection
    )
    out = tmp_path / "hf"
    if norm == "pre" and tie in ("none", "decoder") and not SEPARATE:
        with pytest.raises(UserError, match="export it with transformers >= 5"):
            export_huggingface(checkpoint, out)
        return
    metadata = export_huggingface(checkpoint, out)
    assert metadata["transformers_class"] == (
        "PegasusForConditionalGeneration" if norm == "pre" else "MarianMTModel"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    data = PreparedData(prepared["joint"])
    sources_text = (small_corpus / "valid.en").read_text().splitlines()[:100]
    targets = data.processor("tgt").encode((small_corpus / "valid.de").read_text().splitlines()[:100])
    ours, src, tgt = teacher_forced(model, data.processor("src").encode(sources_text), targets)
    batch = tokenizer(sources_text, return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], src)  # the tokenizer's ids are nmt-tie's
    with torch.no_grad():
        theirs = loaded(**batch, decoder_input_ids=tgt, decoder_attention_mask=(tgt != PAD_ID).long()).logits
    real = tgt != PAD_ID
    assert (ours - theirs)[real].abs().max() < 1e-4  # every token of 100 sentences


def vocabulary_matrices(directory: Path, vocab: int) -> list[str]:
    """Names of the vocabulary-sized matrices in model.safetensors."""
    stored = safetensors_torch.load_file(directory / "model.safetensors")
    return sorted(name for name, t in stored.items() if t.dim() == 2 and t.size(0) == vocab)


@pytest.mark.parametrize(
    "norm, tie, stored",
    [("post", "all", 1), ("post", "decoder", 2), ("post", "none", 3), ("pre", "all", 1), ("pre", "none", 4)],
)
def test_a_tied_matrix_is_stored_once(norm, tie, stored, prepared, tmp_path):  # noqa: F811
    if norm == "pre" and not SEPARATE:
        pytest.skip("transformers 4.x: a pre-norm untied model is refused (tested above)")
    checkpoint, model = random_checkpoint(tmp_path / "model.pt", prepared["joint"], tie=tie, norm=norm)
    export_huggingface(checkpoint, tmp_path / "hf")
    vocab = model.embeddings.weight("output").size(0)
    # Pegasus ties all or nothing: untied, it keeps its own `shared` matrix besides (said at export)
    assert len(vocabulary_matrices(tmp_path / "hf", vocab)) == stored
    if tie == "all":
        untied, _ = random_checkpoint(tmp_path / "none.pt", prepared["joint"], tie="none", norm=norm)
        export_huggingface(untied, tmp_path / "hf-none")
        size = (tmp_path / "hf" / "model.safetensors").stat().st_size
        assert size < (tmp_path / "hf-none" / "model.safetensors").stat().st_size


RARE_TEXT = [
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "emoji 😀🤖, CJK 中文字符, combining é, ligature ﬁ, Ǆ, math ∮ E⋅da = Q",
    "non-breaking\u00a0space, zero\u200bwidth, tab\tand  double  spaces ",
    "a literal </s> and <pad> and <unk> typed in text",
    "",
]


@pytest.mark.parametrize("kind", ["joint", "separate"])
def test_the_tokenizers_ids_are_nmt_ties_on_rare_and_unknown_characters(kind, prepared, tmp_path):  # noqa: F811
    checkpoint, _ = random_checkpoint(tmp_path / "model.pt", prepared[kind], tie="none", norm="post")
    export_huggingface(checkpoint, tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    data = PreparedData(prepared[kind])
    for text in RARE_TEXT:
        assert tokenizer(text)["input_ids"] == data.processor("src").encode([text])[0] + [EOS_ID], text
        target_ids = tokenizer(text_target=text)["input_ids"]
        assert target_ids == data.processor("tgt").encode([text])[0] + [EOS_ID], text
        decoded = tokenizer.decode(target_ids, skip_special_tokens=True)
        assert decoded == data.processor("tgt").decode(target_ids[:-1]).strip()


def test_generate_finds_nmt_ties_beam_search_translations(trained, small_corpus, tmp_path):  # noqa: F811
    export_huggingface(trained, tmp_path / "hf", beam=4, lenpen=1.0)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["num_beams"] == 4 and generation["early_stopping"] is True
    assert generation["decoder_start_token_id"] == BOS_ID and generation["bad_words_ids"] == [
        [PAD_ID],
        [BOS_ID],
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    lines = (small_corpus / "valid.en").read_text().splitlines()[:60]
    torch.set_num_threads(1)
    ours = Translator.from_checkpoints([trained], SearchOptions(beam=4)).translate(lines)
    same = 0
    for line, hyps in zip(lines, ours, strict=True):
        batch = tokenizer([line], return_tensors="pt")
        limit = int(1.5 * batch["input_ids"].size(1) + 10)  # nmt-tie's, for this sentence
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=limit)
        same += tokenizer.decode(output[0], skip_special_tokens=True) == hyps[0][0]
    # equal but for near-ties of this barely trained model (the converged one: README)
    assert same >= 0.9 * len(lines)


def test_what_has_no_transformers_counterpart_is_refused_in_one_line(prepared, tmp_path, capsys):  # noqa: F811
    from test_model import tiny_config

    from nmt_tie.checkpoint import model_payload, save_atomic, vocab_payload
    from nmt_tie.model.seq2seq import build_model, configure_for_data

    data = PreparedData(prepared["joint"])
    rnn = build_model(configure_for_data(tiny_config("rnn"), data))
    vocab = vocab_payload(data.processor("src"), data.processor("tgt"), True)
    save_atomic(model_payload(rnn, rnn.config, vocab), tmp_path / "rnn.pt")
    code, _, err = run_cli(
        capsys, "export", str(tmp_path / "rnn.pt"), "--to", "huggingface", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "the paper's RNN" in err and err.count("\n") == 1
    checkpoint, _ = random_checkpoint(tmp_path / "model.pt", prepared["joint"])
    payload = torch.load(checkpoint, weights_only=True)
    payload["vocab"]["moses"] = True
    save_atomic(payload, tmp_path / "moses.pt")
    with pytest.raises(UserError, match="Moses-tokenized"):
        export_huggingface(tmp_path / "moses.pt", tmp_path / "o")
    (tmp_path / "busy").mkdir()
    with pytest.raises(UserError, match="busy exists: give --force"):
        export_huggingface(checkpoint, tmp_path / "busy")
    with pytest.raises(UserError, match="not an nmt-tie export"):
        export_huggingface(checkpoint, tmp_path / "busy", force=True)
    assert not (tmp_path / "o").exists()


def test_the_model_card_says_what_the_model_is_and_how_to_use_it(trained, tmp_path):  # noqa: F811
    export_huggingface(trained, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- en\n- de\n")
    for expected in (
        "three-way tied",
        "Parameters:",
        "AutoModelForSeq2SeqLM",
        "Training (nmt-tie train)",
        "SHA-256",
    ):
        assert expected in card, expected


# --- Argos Translate ------------------------------------------------------------------------------

ARGOS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["ARGOS_CHUNK_TYPE"] = "SPACY"  # the package's own sentence splitter: no download
    import argostranslate.package, argostranslate.translate
    argostranslate.package.install_from_path(sys.argv[1])
    installed = [p.code for p in argostranslate.package.get_installed_packages()]
    lines = open(sys.argv[2], encoding="utf-8").read().splitlines()
    out = [argostranslate.translate.translate(line, "en", "de") for line in lines]
    print(json.dumps({"installed": installed, "translations": out}))
    """
)


def test_an_argos_package_installs_and_translates_as_nmt_tie_does(trained, small_corpus, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("argostranslate")
    package = tmp_path / "en_de.argosmodel"
    code, out, _ = run_cli(capsys, "export", str(trained), "--to", "argos", "--out", str(package))
    assert code == 0 and "en -> de" in out and "(int8)" in out
    lines = [
        line for line in (small_corpus / "valid.en").read_text().splitlines()[:40] if line.count(".") <= 1
    ]
    (tmp_path / "in.en").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    home = tmp_path / "argos-home"
    env = {
        **os.environ,
        "ARGOS_PACKAGES_DIR": str(home / "packages"),
        "HOME": str(home),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", ARGOS_SCRIPT, str(package), str(tmp_path / "in.en")],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argos = json.loads(result.stdout.strip().splitlines()[-1])
    assert argos["installed"] == ["translate-en_de"]
    # nmt-tie on the package's own CTranslate2 model, with Argos' beam and length penalty
    from nmt_tie.deploy import ExportedTranslator

    folder = next((home / "packages").iterdir())
    assert {"metadata.json", "sentencepiece.model", "README.md", "model", "spacy"} <= {
        p.name for p in folder.iterdir()
    }
    ours = ExportedTranslator(folder / "model", SearchOptions(beam=4, lenpen=0.2), threads=1).translate(lines)
    # Argos' decoding turns underscores into spaces
    same = sum(a == b[0][0].replace("_", " ") for a, b in zip(argos["translations"], ours, strict=True))
    assert same >= 0.95 * len(lines), list(zip(argos["translations"], ours, strict=True))[:3]


def test_what_argos_cannot_hold_is_refused(prepared, tmp_path, capsys):  # noqa: F811
    from nmt_tie.argos_export import export_argos

    checkpoint, _ = random_checkpoint(tmp_path / "separate.pt", prepared["separate"], tie="none")
    with pytest.raises(UserError, match="two vocabularies"):
        export_argos(checkpoint, tmp_path / "x.argosmodel")
    with pytest.raises(UserError, match="named \\*.argosmodel"):
        export_argos(checkpoint, tmp_path / "x.zip")
    (tmp_path / "notes.argosmodel").write_text("mine")
    joint, _ = random_checkpoint(tmp_path / "joint.pt", prepared["joint"])
    with pytest.raises(UserError, match="is not a package"):
        export_argos(joint, tmp_path / "notes.argosmodel", force=True)
    assert (tmp_path / "notes.argosmodel").read_text() == "mine"


def test_a_path_of_another_kind_is_named_with_what_to_give_instead(trained, prepared, tmp_path, capsys):  # noqa: F811
    """Every command that reads a checkpoint or an export says what it was given instead (a run
    directory, an export of another kind, an Argos package, prepared data) and what to give."""
    import zipfile

    run_dir = trained.parent
    exports = {kind: tmp_path / name for kind, name in [("ctranslate2", "ct2"), ("huggingface", "hf")]}
    exports["argos"] = tmp_path / "m.argosmodel"
    for kind, out in exports.items():
        assert run_cli(capsys, "export", str(trained), "--to", kind, "--out", str(out))[0] == 0
    out = str(tmp_path / "out")
    run_dir_line = f"{run_dir} is a training run directory, not a checkpoint (.pt)"
    hf = exports["huggingface"]
    hf_line = f"{hf} is a Hugging Face transformers export, not an nmt-tie CTranslate2 export"
    cases = [
        (["translate", "-c", run_dir], f"{run_dir_line} or an nmt-tie export"),
        (["export", run_dir, "--out", out], run_dir_line),
        (["average", run_dir, trained, "-o", out], run_dir_line),
        (["translate", "-c", exports["huggingface"]], hf_line),
        (["params", exports["huggingface"]], hf_line),
        (["translate", "-c", exports["argos"]], f"{exports['argos']} is an Argos Translate package"),
        (["export", exports["ctranslate2"], "--out", out], "CTranslate2 export, not a checkpoint (.pt):"),
        (["translate", "-c", prepared["joint"]], "is a prepared data directory"),
        (["params", exports["argos"]], "is an Argos Translate package, not a YAML config"),
        (["train", tmp_path / "binary.yaml"], "binary.yaml: not a YAML config (not UTF-8 text)"),
    ]
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *map(str, argv))
        assert code == 2 and expected in err and err.count("\n") == 1, (argv, err)
        if "run directory" in expected:
            assert f"give one of its checkpoints: {run_dir / 'best.pt'}, {trained}" in err  # in full
    with zipfile.ZipFile(exports["argos"]) as archive:
        archive.extractall(tmp_path / "unpacked")
    (package,) = (tmp_path / "unpacked").iterdir()
    code, _, err = run_cli(capsys, "translate", "-c", str(package))
    assert code == 2 and f"give its model folder, {package / 'model'}" in err
    (tmp_path / "in.en").write_text("a man is walking .\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, "translate", "-c", str(package / "model"), "-i", str(tmp_path / "in.en"))
    assert code == 0 and len(out.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "to, option, value",
    [
        ("huggingface", "--quantization", "int8"),
        ("ctranslate2", "--beam", "3"),
        ("argos", "--lenpen", "0.6"),
        ("ctranslate2", "--src-code", "fr"),
        ("huggingface", "--tgt-code", "fr"),
    ],
)
def test_an_option_the_chosen_export_does_not_read_is_refused(to, option, value, trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / ("x.argosmodel" if to == "argos" else "x")
    code, _, err = run_cli(capsys, "export", str(trained), "--to", to, "--out", str(out), option, value)
    assert code == 2 and f"{option} is for --to " in err and f"not --to {to}" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value", [("--src-code", "english"), ("--tgt-code", "DE"), ("--src-code", "e")]
)
def test_an_argos_language_code_is_two_or_three_lower_case_letters(option, value, trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "x.argosmodel"
    code, _, err = run_cli(capsys, "export", str(trained), "--to", "argos", "--out", str(out), option, value)
    assert code == 2 and f"{option} {value!r}: Argos names languages by 2 or 3 lower-case letters" in err
    assert not out.exists()
