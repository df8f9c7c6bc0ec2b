"""The README that ships with an exported model: what it is, what it was trained on and how,
how well it translates (sacreBLEU scores with their signatures), and how to use it.

Everything is read from the checkpoint and, when the checkpoint sits in its run directory,
from the run's config.yaml, log.jsonl and score files, and from the prepared data directory
the run names (prepare.json, stats.json) when it is still there. What is not known is said
to be unknown, never guessed. A recipe that knows more (how its training data was made, as the
distillation recipe does) writes it to `card.md` in the run directory: the card includes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from nmt_tie.model.embeddings import MATRIX_OF_ROLE

TIE_NAMES = {
    "none": "untied (three matrices: source, target input, output)",
    "decoder": "decoder-tied (the target input and output embeddings are one matrix)",
    "src-tgt": "source and target input embeddings shared, output apart",
    "all": "three-way tied (one matrix is encoder input, decoder input and output embedding)",
}
TRAINING_KEYS = (
    "optimizer", "lr", "schedule", "warmup", "max_tokens", "global_batch_tokens", "update_freq",
    "label_smoothing", "dropout", "dtype", "seed", "max_updates", "patience", "valid_metric",
)  # fmt: skip


def run_facts(checkpoint: Path, payload: dict) -> dict:
    """What the run directory around `checkpoint` and its data directory say, where they exist."""
    run = checkpoint.parent
    facts: dict = {
        "updates": payload.get("trainer", {}).get("update"),
        "valid": payload.get("trainer", {}).get("valid"),
    }
    config_file = run / "config.yaml"
    if config_file.is_file():
        facts["config"] = yaml.safe_load(config_file.read_text())
    facts["scores"] = {}
    for score_file in sorted(run.glob("*.score.json")):
        facts["scores"][score_file.name.removesuffix(".score.json")] = json.loads(score_file.read_text())
    if (run / "card.md").is_file():
        facts["recipe_notes"] = (run / "card.md").read_text(encoding="utf-8").strip()
    data = Path(facts.get("config", {}).get("data", "")) if facts.get("config") else None
    if data and (data / "prepare.json").is_file():
        facts["prepare"] = json.loads((data / "prepare.json").read_text())
        facts["stats"] = json.loads((data / "stats.json").read_text())
    return facts


def describe_model(payload: dict, model) -> list[str]:
    from nmt_tie.report import count_unique, meta_model, mode_config

    config = payload["model_config"]
    tie = config["tie"]
    params = count_unique(model)
    untied = count_unique(meta_model(mode_config(model.config, "none")))
    roles = MATRIX_OF_ROLE[tie]
    return [
        f"- Transformer, {config['norm']}-norm: width {config['emb_dim']}, {config['enc_layers']} encoder "
        f"and {config['dec_layers']} decoder layers, {config['heads']} heads, feed-forward "
        f"{config['ffn_dim']}, ReLU, sinusoidal positions, input embeddings scaled by sqrt(width)"
        + (
            ", projection regularization (P folded into the output layer)"
            if config.get("projection_reg")
            else ""
        ),
        f"- Tying: {TIE_NAMES[tie]} (encoder input: {roles['encoder_input']}, decoder input: "
        f"{roles['decoder_input']}, output: {roles['output']})",
        f"- Parameters: {params:,}, against {untied:,} for the same model untied "
        f"({1 - params / untied:.1%} fewer)",
        f"- Vocabulary: SentencePiece BPE, {config['src_vocab_size']:,} pieces"
        + (" shared by both languages" if config.get("shared_vocab") else f" / {config['tgt_vocab_size']:,}"),
    ]


def describe_training(facts: dict) -> list[str]:
    lines = []
    prepare, stats = facts.get("prepare"), facts.get("stats")
    if prepare:
        inputs = prepare["inputs"]
        train = ", ".join(Path(entry["path"]).name for entry in inputs.get("train", {}).values())
        kept = stats["splits"]["train"].get("kept") if stats else None
        lines.append(
            f"- Data: {train}"
            + (f" ({kept:,} training pairs after length filtering)" if kept else "")
            + f"; validation {', '.join(Path(e['path']).name for e in inputs.get('valid', {}).values())}"
        )
        options = prepare["options"]
        lines.append(
            f"- Preparation: {'joint' if options['joint'] else 'separate'} BPE of {options['vocab_size']:,}, "
            f"pairs up to {options['max_len']} pieces, length ratio up to {options['max_ratio']}"
        )
    else:
        lines.append("- Data: not recorded beside the checkpoint (its prepared data directory was not found)")
    config = facts.get("config")
    if config:
        settings = ", ".join(
            f"{key} {config[key]}" for key in TRAINING_KEYS if config.get(key) not in (None, 0, "")
        )
        lines.append(f"- Training (nmt-tie train): {settings}")
    if facts.get("updates") is not None:
        lines.append(f"- This checkpoint: update {facts['updates']:,}")
    valid = facts.get("valid") or {}
    if valid.get("bleu") is not None:
        lines.append(
            f"- Validation at that update: BLEU {valid['bleu']:.2f} ({valid.get('search', 'greedy')})"
        )
    return lines


def describe_scores(facts: dict) -> list[str]:
    """The run's score files: TEST (its best.pt), TEST.averaged, TEST.export-TYPE."""
    lines = []
    for name, score in facts.get("scores", {}).items():
        test, _, variant = name.partition(".")
        of = {"": "best.pt", "averaged": "averaged.pt"}.get(variant, f"through the {variant} export")
        for metric in ("bleu", "chrf"):
            if metric in score:
                lines.append(f"- {test} ({of}): {score[metric]['text']} (`{score[metric]['signature']}`)")
    return lines or ["- No scores were found beside the checkpoint (`nmt-tie score --out` writes them)."]


def model_card(
    checkpoint: Path, payload: dict, model, title: str, usage: list[str], notes: list[str], front_matter: dict
) -> str:
    facts = run_facts(checkpoint, payload)
    lines = ["---", yaml.safe_dump(front_matter, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += [f"Exported by nmt-tie from `{checkpoint.name}`.", ""]
    lines += ["## Model", "", *describe_model(payload, model), ""]
    lines += ["## Training", "", *describe_training(facts), ""]
    if "recipe_notes" in facts:
        lines += [facts["recipe_notes"], ""]
    lines += ["## Scores (sacreBLEU)", "", *describe_scores(facts), ""]
    lines += ["## Use", "", *usage, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(lines)


def write_model_card(directory: Path, checkpoint: Path, payload: dict, metadata: dict, model) -> None:
    """README.md of a Hugging Face export."""
    vocab = payload["vocab"]
    src, tgt = vocab["src_lang"], vocab["tgt_lang"]
    search = metadata["search"]
    usage = [
        "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, pipeline",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
        'model = AutoModelForSeq2SeqLM.from_pretrained("THIS_DIRECTORY")',
        'batch = tokenizer(["A man is riding a bicycle."], return_tensors="pt", padding=True)',
        f"output = model.generate(**batch)  # beam {search['beam']}, length penalty {search['lenpen']}",
        "print(tokenizer.batch_decode(output, skip_special_tokens=True))",
        "",
        'translator = pipeline("translation", model=model, tokenizer=tokenizer)',
        'print(translator("A dog runs.")[0]["translation_text"])',
        "```",
        "",
        "`generation_config.json` reproduces nmt-tie's beam search: the beam, `length_penalty` as nmt-tie's "
        "`--lenpen` (score / length ** lenpen, the length counting EOS), a sentence done once `num_beams` "
        "hypotheses ended, PAD and BOS never generated. nmt-tie limits each sentence's output to "
        "1.5 x (source pieces + 1) + 10; `generate` takes one limit per call (`max_length`, set for the "
        "longest input nmt-tie translates): for one sentence, pass "
        "`max_new_tokens=int(1.5 * len(input_ids[0]) + 10)` to apply nmt-tie's.",
        "",
        "To publish it, upload the directory as it is: `huggingface-cli upload USER/NAME THIS_DIRECTORY` "
        "(or `HfApi().upload_folder`).",
    ]
    notes = [
        f"transformers class: `{metadata['transformers_class']}` (transformers "
        f"{metadata['transformers_version']}); its logits equal nmt-tie's within "
        f"{metadata['largest_logit_difference']:.1e} (checked at export)"
    ]
    if metadata["transformers_class"] == "MarianMTModel":
        notes.append(
            "Marian computes its own position table when it *saves* a model again (`save_pretrained`, "
            "`push_to_hub` from a loaded model), with other frequencies than nmt-tie's: this directory "
            "carries nmt-tie's table in model.safetensors; re-saved, the model would translate differently"
        )
    notes += metadata["notes"]
    notes.append(f"source checkpoint SHA-256: `{metadata['source_checkpoint_sha256']}`")
    title = f"nmt-tie {src}-{tgt} Transformer, {payload['model_config']['tie']}-tied"
    front = {"language": [src, tgt], "library_name": "transformers", "pipeline_tag": "translation",
             "tags": ["translation", "nmt-tie", "tied-embeddings"]}  # fmt: skip
    (directory / "README.md").write_text(
        model_card(checkpoint, payload, model, title, usage, notes, front), encoding="utf-8"
    )
