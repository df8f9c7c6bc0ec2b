"""Parameter accounting (`nmt-tie params`): per component, unique totals, tying reduction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from nmt_tie.config import ModelConfig
from nmt_tie.model.seq2seq import EncoderDecoder, build_model

ROLE_NAMES = {
    "encoder_input": "encoder input",
    "decoder_input": "decoder input",
    "output": "output",
}


def count_unique(module: nn.Module) -> int:
    """Parameters counted once per tensor, however many roles or names share it."""
    seen: dict[int, int] = {}
    for param in module.parameters():  # parameters() already yields each tensor once
        seen[id(param)] = param.numel()
    return sum(seen.values())


def unique_storage_elements(state_dict: dict[str, torch.Tensor]) -> int:
    """Elements of a state dict counted once per underlying storage (a check on files)."""
    seen: dict[tuple, int] = {}
    for tensor in state_dict.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        seen[key] = tensor.numel()
    return sum(seen.values())


def breakdown(model: EncoderDecoder) -> list[tuple[str, int]]:
    """(component, parameters) rows; each embedding matrix named with the roles it serves."""
    rows: list[tuple[str, int]] = []
    embeddings = model.embeddings
    labels = {
        ("encoder_input",): "encoder embedding",
        ("decoder_input",): "decoder embedding",
        ("output",): "output embedding",
    }
    for name, matrix in embeddings.matrices.items():
        roles = tuple(embeddings.roles_of(name))
        label = labels.get(roles) or "shared embedding (" + " = ".join(ROLE_NAMES[r] for r in roles) + ")"
        rows.append((label, matrix.numel()))
    rows.append(("output bias", embeddings.output_bias.numel()))
    if embeddings.projection is not None:
        rows.append(("projection P", embeddings.projection.numel()))
    if embeddings.projection_bias is not None:
        rows.append(("projection bias", embeddings.projection_bias.numel()))
    for name, child in model.named_children():
        if name != "embeddings":
            rows.append((f"{name} (everything else)", count_unique(child)))
    return rows


def shared_roles(model: EncoderDecoder) -> list[str]:
    """Lines like 'embeddings.matrices.shared: encoder input, decoder input, output'."""
    embeddings = model.embeddings
    return [
        f"embeddings.matrices.{name}: " + ", ".join(ROLE_NAMES[r] for r in embeddings.roles_of(name))
        for name in embeddings.matrices
    ]


def meta_model(config):
    """Build without allocating memory: enough to count a 168M-parameter model anywhere.

    `config` is a ModelConfig (translation) or an LMConfig (language model)."""
    from nmt_tie.model.lstm_lm import LMConfig, LSTMLanguageModel

    with torch.device("meta"):
        return LSTMLanguageModel(config) if isinstance(config, LMConfig) else build_model(config)


def mode_config(config: ModelConfig, tie: str, vocab: dict[str, int] | None = None) -> ModelConfig:
    """The same config with another tying mode (and, from flags, that mode's vocabularies).

    `vocab` has src/tgt (separate vocabularies) and/or joint sizes: untied and decoder-tied
    models use the separate ones when given, src-tgt and three-way tied ones need the joint.
    """
    changes: dict = {"tie": tie}
    if vocab and isinstance(config, ModelConfig):
        joint = vocab.get("joint")
        separate = vocab.get("src") and vocab.get("tgt")
        if tie in ("src-tgt", "all") or not separate:
            changes.update(src_vocab_size=joint, tgt_vocab_size=joint, shared_vocab=True)
        else:
            changes.update(src_vocab_size=vocab["src"], tgt_vocab_size=vocab["tgt"], shared_vocab=False)
    return dataclasses.replace(config, **changes)


def params_by_mode(config: ModelConfig, modes: list[str], vocab: dict[str, int] | None = None) -> dict:
    """{mode: {"params": N, "reduction": fraction saved against tie: none}}."""
    untied = count_unique(meta_model(mode_config(config, "none", vocab)))
    result = {}
    for mode in modes:
        params = count_unique(meta_model(mode_config(config, mode, vocab)))
        result[mode] = {"params": params, "reduction": round(1 - params / untied, 4)}
    return result


def format_params(model: EncoderDecoder, untied: int, checkpoint: Path | None = None, state_dict=None) -> str:
    config = model.config
    total = count_unique(model)
    if isinstance(config, ModelConfig):
        vocabulary = f"vocabulary {config.src_vocab_size} -> {config.tgt_vocab_size}"
    else:
        vocabulary = f"vocabulary {config.vocab_size}"
    lines = [f"arch {config.arch}, tie {config.tie}, {vocabulary}", ""]
    width = 60
    for label, count in breakdown(model):
        lines.append(f"{label:<{width}}{count:>14,}")
    lines.append(f"{'total (each tensor once)':<{width}}{total:>14,}")
    lines.append(f"{'untied twin (tie: none)':<{width}}{untied:>14,}")
    lines.append(f"{'reduction':<{width}}{1 - total / untied:>14.1%}")
    if checkpoint is not None:
        lines.append(f"{'checkpoint file bytes':<{width}}{checkpoint.stat().st_size:>14,}")
        if state_dict is not None:
            stored = unique_storage_elements(state_dict)
            lines.append(f"{'parameters stored in the file':<{width}}{stored:>14,}")
    lines += ["", "matrices and the roles they serve (one tensor each):"]
    lines += [f"  {line}" for line in shared_roles(model)]
    return "\n".join(lines)


def format_modes(result: dict) -> str:
    lines = [f"{'tie':<10}{'parameters':>16}{'reduction':>12}"]
    for mode, entry in result.items():
        lines.append(f"{mode:<10}{entry['params']:>16,}{entry['reduction']:>12.1%}")
    return "\n".join(lines)


def export_summary(directory: Path, metadata: dict, untied_params: int) -> dict:
    """Sizes of an export (`nmt-tie export`) against its source checkpoint and against the
    untied twin in float32 (4 bytes a parameter: what an untied model ships without tying
    or quantization)."""
    from nmt_tie.deploy import export_sizes

    sizes = export_sizes(directory)
    source = metadata["source_checkpoint_bytes"]
    return {
        "quantization": metadata["quantization"],
        "source_checkpoint": metadata["source_checkpoint"],
        "source_checkpoint_bytes": source,
        **sizes,
        "fraction_of_source_checkpoint": round(sizes["model_bin_bytes"] / source, 4),
        "fraction_of_untied_fp32": round(sizes["model_bin_bytes"] / (4 * untied_params), 4),
        "projection_folded": metadata["projection_folded"],
    }


def format_export(summary: dict) -> str:
    width = 60
    lines = [
        "",
        f"export ({summary['quantization']}) of {summary['source_checkpoint']}:",
        f"{'  source checkpoint bytes':<{width}}{summary['source_checkpoint_bytes']:>14,}",
        f"{'  model.bin bytes (what ships)':<{width}}{summary['model_bin_bytes']:>14,}",
        f"{'  directory bytes (with vocabularies, SentencePiece)':<{width}}{summary['directory_bytes']:>14,}",
        f"{'  model.bin / source checkpoint':<{width}}{summary['fraction_of_source_checkpoint']:>14.1%}",
        f"{'  model.bin / untied twin in float32':<{width}}{summary['fraction_of_untied_fp32']:>14.1%}",
    ]
    return "\n".join(lines)
