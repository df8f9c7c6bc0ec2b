"""Do the Hugging Face and Argos exports translate as nmt-tie does? (issue 41)

For a checkpoint, translates Multi30k test2016 (1,000 sentences):

- with nmt-tie (PyTorch, fp32, beam and length penalty as asked) and with transformers'
  `generate` on `nmt-tie export --to huggingface` (the same beam and length penalty, from its
  generation_config.json; batches of 16, padded, `max_new_tokens` the longest sentence's
  nmt-tie limit), and counts identical translations;
- with argostranslate on `nmt-tie export --to argos` (installed into a temporary package
  directory, `ARGOS_CHUNK_TYPE=SPACY`: no download) and with `nmt-tie translate` on the same
  package's CTranslate2 model at Argos' beam 4 and length penalty 0.2, and counts identical
  translations;

and prints sacreBLEU of each, the share identical, and the bytes of the exports (with
`--untied`, also those of the untied model's, for the size of tying in each format).

    python recipes/shipping/agreement.py runs/multi30k/en-de/transformer-all-seed1/averaged.pt \
        [--untied runs/multi30k/en-de/transformer-none-seed1/averaged.pt] [--out results/agreement.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nmt_tie.data.locations import data_root  # noqa: E402
from nmt_tie.data.text import read_lines  # noqa: E402

TEST = "test_2016_flickr"
ARGOS = textwrap.dedent(
    """
    import json, os, sys
    os.environ["ARGOS_CHUNK_TYPE"] = "SPACY"
    import argostranslate.package, argostranslate.translate
    argostranslate.package.install_from_path(sys.argv[1])
    lines = open(sys.argv[2], encoding="utf-8").read().splitlines()
    print(json.dumps([argostranslate.translate.translate(line, sys.argv[3], sys.argv[4]) for line in lines]))
    """
)


def huggingface_translations(directory: Path, lines: list[str], batch: int = 16) -> list[str]:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    out = []
    for start in range(0, len(lines), batch):
        inputs = tokenizer(lines[start : start + batch], return_tensors="pt", padding=True)
        limit = int(1.5 * inputs["input_ids"].size(1) + 10)  # nmt-tie's, for the longest source
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=limit)
        out += tokenizer.batch_decode(generated, skip_special_tokens=True)
    return out


def argos_translations(package: Path, lines: list[str], src: str, tgt: str) -> list[str]:
    with tempfile.TemporaryDirectory() as home:
        source = Path(home) / "in.txt"
        source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        env = {**os.environ, "ARGOS_PACKAGES_DIR": str(Path(home) / "packages"), "HOME": home}
        result = subprocess.run(
            [sys.executable, "-c", ARGOS, str(package), str(source), src, tgt],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--untied", type=Path, help="its untied twin: export sizes side by side")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=1.0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    import sacrebleu
    import torch

    from nmt_tie.argos_export import export_argos
    from nmt_tie.deploy import ExportedTranslator
    from nmt_tie.hf_export import export_huggingface
    from nmt_tie.translate import SearchOptions, Translator

    torch.set_num_threads(2)
    multi30k = data_root() / "multi30k"
    lines = list(read_lines(multi30k / f"{TEST}.en.gz"))
    references = list(read_lines(multi30k / f"{TEST}.de.gz"))

    def bleu(hypotheses: list[str]) -> float:
        return round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2)

    def same(a: list[str], b: list[str]) -> float:
        return round(sum(map(str.__eq__, a, b)) / len(a), 4)

    results: dict = {"checkpoint": str(args.checkpoint), "sentences": len(lines)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        started = time.perf_counter()
        options = SearchOptions(beam=args.beam, lenpen=args.lenpen)
        ours = [h[0][0] for h in Translator.from_checkpoints([args.checkpoint], options).translate(lines)]
        export_huggingface(args.checkpoint, work / "hf", beam=args.beam, lenpen=args.lenpen)
        theirs = huggingface_translations(work / "hf", lines)
        results["huggingface"] = {
            "search": f"beam {args.beam}, lenpen {args.lenpen}",
            "nmt_tie_bleu": bleu(ours),
            "transformers_bleu": bleu(theirs),
            "identical": same(ours, theirs),
            "safetensors_bytes": (work / "hf" / "model.safetensors").stat().st_size,
            "class": json.loads((work / "hf" / "nmt_tie.json").read_text())["transformers_class"],
        }
        export_argos(args.checkpoint, work / "model.argosmodel")
        vocab = torch.load(args.checkpoint, weights_only=True)["vocab"]
        argos = argos_translations(work / "model.argosmodel", lines, vocab["src_lang"], vocab["tgt_lang"])
        unpacked = work / "unpacked"
        import zipfile

        zipfile.ZipFile(work / "model.argosmodel").extractall(unpacked)
        model_dir = next(unpacked.iterdir()) / "model"
        argos_options = SearchOptions(beam=4, lenpen=0.2)  # what Argos translates with
        ours_as_argos = [
            h[0][0] for h in ExportedTranslator(model_dir, argos_options, threads=2).translate(lines)
        ]
        results["argos"] = {
            "search": "beam 4, lenpen 0.2 (Argos' own)",
            "nmt_tie_bleu": bleu(ours_as_argos),
            "argostranslate_bleu": bleu(argos),
            "identical": same(ours_as_argos, argos),
            "package_bytes": (work / "model.argosmodel").stat().st_size,
        }
        if args.untied:
            export_huggingface(args.untied, work / "hf-untied")
            untied = (work / "hf-untied" / "model.safetensors").stat().st_size
            results["huggingface"]["untied_safetensors_bytes"] = untied
            results["huggingface"]["tied_share_of_untied"] = round(
                results["huggingface"]["safetensors_bytes"] / untied, 4
            )
        results["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
