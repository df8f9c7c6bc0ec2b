"""Export a Transformer checkpoint as an Argos Translate package (`.argosmodel`), the models
LibreTranslate serves.

A package is a zip archive holding one folder with `metadata.json` (language codes and
names), the CTranslate2 model in `model/` (nmt-tie's own CTranslate2 export: each tied matrix
stored once, the source EOS added by CTranslate2 itself since Argos adds none, PAD and BOS
never generated), `sentencepiece.model` (Argos applies it itself), a `README.md` model card,
and `spacy/`: a blank spaCy pipeline for the source language, which Argos uses to split
sentences when `ARGOS_CHUNK_TYPE=SPACY` (its default splitter, MiniSBD, downloads a model on
first use; this one needs no network).

Argos translates with beam 4 (`ARGOS_BEAM_SIZE`) and a length penalty of 0.2 fixed in its
code, where nmt-tie's defaults are beam 5 and 1.0: `nmt-tie translate -c PACKAGE/model --beam
4 --lenpen 0.2` translates as Argos does (recipes/benchmarks/export_agreement.py measures it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

from nmt_tie.artifacts import METADATA_FILE
from nmt_tie.errors import UserError

LANGUAGE_NAMES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fi": "Finnish",
    "fr": "French", "it": "Italian", "ja": "Japanese", "nl": "Dutch", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "tr": "Turkish", "uk": "Ukrainian", "zh": "Chinese",
}  # fmt: skip
PACKAGE_VERSION = "1.0"
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")  # ISO 639-1 or -3, as in the Argos package index


def export_argos(
    checkpoint: str | Path,
    out: str | Path,
    quantization: str = "int8",
    src_code: str | None = None,
    tgt_code: str | None = None,
    force: bool = False,
    max_positions: int = 1024,
) -> dict:
    """Write `out` (FILE.argosmodel, atomically); return the package's metadata.json."""
    from nmt_tie.checkpoint import load_checkpoint, load_model
    from nmt_tie.deploy import export_ctranslate2
    from nmt_tie.model_card import model_card

    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".argosmodel":
        raise UserError(f"--out {out}: an Argos package is a file named *.argosmodel")
    if out.exists() and not force:
        raise UserError(f"{out} exists: give --force to replace it")
    if out.exists() and not zipfile.is_zipfile(out):
        raise UserError(
            f"{out} exists and is not a package, which --force would replace; choose another --out"
        )
    payload = load_checkpoint(checkpoint)
    vocab = payload.get("vocab") or {}
    if not vocab.get("joint", True):
        raise UserError(
            f"{checkpoint} has two vocabularies (prepare --separate): an Argos package holds one "
            "SentencePiece model; re-prepare with a joint vocabulary to package it"
        )
    if vocab.get("moses"):
        raise UserError(
            f"{checkpoint} was trained on Moses-tokenized text (prepare --moses): Argos applies "
            "SentencePiece only; re-prepare without --moses to package it"
        )
    from_code = _language_code("--src-code", src_code, vocab.get("src_lang"))
    to_code = _language_code("--tgt-code", tgt_code, vocab.get("tgt_lang"))
    metadata = {
        "package_version": PACKAGE_VERSION,
        "argos_version": "1.9",
        "from_code": from_code,
        "from_name": LANGUAGE_NAMES.get(from_code, from_code),
        "to_code": to_code,
        "to_name": LANGUAGE_NAMES.get(to_code, to_code),
        "type": "translate",
        "code": f"translate-{from_code}_{to_code}",
        "quantization": quantization,
        "nmt_tie_tie": payload.get("model_config", {}).get("tie"),
    }
    folder_name = f"translate-{from_code}_{to_code}-{PACKAGE_VERSION.replace('.', '_')}"
    with tempfile.TemporaryDirectory(
        prefix=".argos-", dir=out.parent if out.parent.exists() else None
    ) as work:
        folder = Path(work) / folder_name
        folder.mkdir()
        # the CTranslate2 export (it checks the checkpoint: a Transformer, not an RNN or an LM)
        export_ctranslate2(checkpoint, folder / "model", quantization, max_positions=max_positions)
        _share_sentencepiece(folder)
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _write_spacy_sentencizer(folder / "spacy", from_code)
        model = load_model(payload).eval()
        title = f"nmt-tie {from_code}-{to_code} for Argos Translate / LibreTranslate"
        front = {"language": [from_code, to_code], "tags": ["translation", "nmt-tie", "argos-translate"]}
        (folder / "README.md").write_text(
            model_card(checkpoint, payload, model, title, _usage(from_code, to_code), [], front),
            encoding="utf-8",
        )
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(folder.rglob("*")):
                    archive.write(path, path.relative_to(folder.parent))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return metadata


def _language_code(flag: str, given: str | None, from_data: str | None) -> str:
    """Argos and LibreTranslate name languages by ISO 639 codes ("en", "de"; "pb", "zt" for
    their variants); a code they cannot match makes a package no one finds."""
    code = given or from_data
    if code and LANGUAGE_CODE.fullmatch(code):
        return code
    if given:
        raise UserError(f"{flag} {given!r}: Argos names languages by 2 or 3 lower-case letters (en, de)")
    raise UserError(
        f"the checkpoint's data names its language {from_data!r}, not an ISO 639 code: give {flag} (en, de)"
    )


def _share_sentencepiece(folder: Path) -> None:
    """Argos reads the SentencePiece model beside metadata.json; the CTranslate2 export in
    model/ names it there too (nmt-tie translate -c PACKAGE/model), so it is stored once."""
    model = folder / "model"
    os.replace(model / "sentencepiece.model", folder / "sentencepiece.model")
    export = json.loads((model / METADATA_FILE).read_text(encoding="utf-8"))
    export["sentencepiece"] = {"source": "../sentencepiece.model", "target": "../sentencepiece.model"}
    (model / METADATA_FILE).write_text(json.dumps(export, indent=2) + "\n", encoding="utf-8")


def _write_spacy_sentencizer(directory: Path, lang: str) -> None:
    """A blank spaCy pipeline of the source language (rule-based sentence splitting needs no
    trained model); spaCy comes with argostranslate."""
    try:
        import spacy
    except ImportError:
        raise UserError("spaCy is not installed: pip install 'nmt-tie[argos]'") from None
    try:
        nlp = spacy.blank(lang)
    except ImportError:  # a language spaCy has no rules for
        nlp = spacy.blank("xx")
    nlp.to_disk(directory)


def _usage(src: str, tgt: str) -> list[str]:
    return [
        "```bash",
        "pip install argostranslate",
        "python -c \"import argostranslate.package as p; p.install_from_path('THIS.argosmodel')\"",
        f'argos-translate --from {src} --to {tgt} "A man is riding a bicycle."',
        "```",
        "",
        f'In Python: `argostranslate.translate.translate(text, "{src}", "{tgt}")`; LibreTranslate serves '
        f"it once installed (`libretranslate --load-only {src},{tgt}`).",
        "",
        "- Argos translates with beam 4 (`ARGOS_BEAM_SIZE=5` for nmt-tie's 5) and a length penalty of "
        "0.2, fixed in its code (nmt-tie's default is 1.0, which favours longer outputs); "
        "`nmt-tie translate -c model --beam 4 --lenpen 0.2` translates as Argos does.",
        "- Argos splits text into sentences first: with `ARGOS_CHUNK_TYPE=SPACY` it uses the blank spaCy "
        "pipeline in `spacy/` (no download); by default it downloads MiniSBD's model on first use.",
        "- Argos' SentencePiece decoding turns underscores in the output into spaces.",
    ]
