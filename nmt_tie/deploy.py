"""Shipping a model: export a Transformer checkpoint to CTranslate2, and translate with it.

CTranslate2 is the engine translation models are shipped with on CPUs (OpenNMT-py, fairseq
and Marian convert to it). `export_ctranslate2` maps nmt-tie's Transformer onto
CTranslate2's `TransformerSpec` weight by weight:

- self-attention keeps its fused query/key/value matrix, cross-attention its query matrix
  and fused key/value matrix (CTranslate2's own layout), pre- or post-norm;
- the sinusoidal position table is written out, so the positions are nmt-tie's exactly;
- the source gets EOS appended (`add_source_eos`) and decoding starts from BOS, as here;
- every tied role is handed the same matrix: CTranslate2 stores variables with equal values
  once (an alias), so a three-way tied matrix is on disk once, quantized or not;
- projection regularization's `(h P + p) W^T + b` is folded into the output layer as
  `h (W P^T)^T + (W p + b)`: exact, but the output matrix is then no longer the embedding,
  so it is stored on its own (the metadata says so);
- PAD and BOS get an output bias of -10^4, so CTranslate2 never generates them (nmt-tie's
  search masks them the same way).

An export is a directory: CTranslate2's `model.bin`, `config.json` and vocabularies, the
SentencePiece model(s), and `nmt_tie.json` with the nmt-tie config, the tie mode, the
quantization and the SHA-256 of the source checkpoint. `nmt-tie translate -c DIR` takes it
as it takes a checkpoint, without loading PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from nmt_tie.artifacts import CTRANSLATE2_FORMAT, METADATA_FILE, wrong_kind
from nmt_tie.data.tokenizer import BOS_ID, PAD_ID, TextProcessor
from nmt_tie.errors import UserError
from nmt_tie.hypotheses import Hypothesis, SearchOptions
from nmt_tie.translate import TextTranslator

# PyTorch is imported by the export functions only: translating through an export needs
# CTranslate2, SentencePiece and sacremoses, not PyTorch.

QUANTIZATIONS = (
    "float32",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
)
# CTranslate2's memory grows with the batch, its speed hardly above 2,048 source tokens a batch
# (Multi30k test2016, float32, beam 5, 2 threads: 4,096 tokens 7.9 s and 427 MB; 2,048 8.2 s
# and 250 MB; 512 12.8 s and 143 MB; all 1,000 sentences at once 9.9 s and 911 MB).
EXPORT_MAX_TOKENS = 2048
MAX_POSITIONS = 1024  # rows of the exported position table: the longest source or output
# nmt-tie's own limits need 1.5 * (256 + 1) + 10 = 396 positions (translate's --max-src-len 256)
MIN_POSITIONS = 400
NEVER_GENERATED = -1.0e4  # output bias of PAD and BOS (fits float16)


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise UserError(
            "CTranslate2 is not installed: pip install 'nmt-tie[ctranslate2]' (or pip install ctranslate2)"
        ) from None
    return ctranslate2


def is_export(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def read_metadata(directory: str | Path) -> dict:
    directory = Path(directory)
    wanted = "an nmt-tie CTranslate2 export"
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        unreadable = f"{directory / METADATA_FILE}: not a readable nmt-tie export ({err})"
        raise UserError(wrong_kind(directory, wanted) or unreadable) from None
    if metadata.get("format") != CTRANSLATE2_FORMAT:
        raise UserError(wrong_kind(directory, wanted) or f"{directory / METADATA_FILE}: not {wanted}")
    return metadata


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _array(tensor):
    return tensor.detach().float().cpu().numpy()


def _set_linear(spec, linear) -> None:
    spec.weight = _array(linear.weight)
    spec.bias = _array(linear.bias)


def _set_norm(spec, norm) -> None:
    spec.gamma = _array(norm.weight)
    spec.beta = _array(norm.bias)


def _set_ffn(spec, layer) -> None:
    _set_norm(spec.layer_norm, layer.ffn_block.norm)
    _set_linear(spec.linear_0, layer.ffn.up)
    _set_linear(spec.linear_1, layer.ffn.down)


def _output_layer(embeddings, matrices: dict) -> tuple:
    """(weight, bias) of logits = h W^T + b as float arrays. Without the projection P the
    weight is the output role's matrix object itself (so a tied one is stored once); with it,
    P and its bias are folded in: (h P + p) W^T + b = h (W P^T)^T + (W p + b)."""
    weight = embeddings.weight("output").detach().float()
    bias = embeddings.output_bias.detach().float().clone()
    folded = None
    if embeddings.projection is not None:
        if embeddings.projection_bias is not None:
            bias += weight @ embeddings.projection_bias.detach().float()
        folded = _array(weight @ embeddings.projection.detach().float().T)
    bias[PAD_ID] = NEVER_GENERATED
    bias[BOS_ID] = NEVER_GENERATED
    unfolded = matrices[embeddings.roles["output"]]
    return (unfolded if folded is None else folded), _array(bias)


def transformer_spec(
    model, config, vocab_src: list[str], vocab_tgt: list[str], max_positions: int = MAX_POSITIONS
):
    """CTranslate2's TransformerSpec holding the weights of an nmt-tie Transformer."""
    require_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    from nmt_tie.model.transformer import sinusoidal_positions

    spec = transformer_spec.TransformerSpec.from_config(
        (config.enc_layers, config.dec_layers),
        config.heads,
        pre_norm=config.norm == "pre",
        activation=common_spec.Activation.RELU,
    )
    spec.config.add_source_eos = True  # nmt-tie's encoder input ends with EOS
    spec.config.layer_norm_epsilon = model.encoder.layers[0].attn_block.norm.eps
    embeddings = model.embeddings
    positions = _array(sinusoidal_positions(max_positions, config.emb_dim))
    # One array object per matrix: tied roles hand CTranslate2 equal values, which it stores once.
    matrices = {name: _array(matrix) for name, matrix in embeddings.matrices.items()}

    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = matrices[embeddings.roles["encoder_input"]]
    decoder.embeddings.weight = matrices[embeddings.roles["decoder_input"]]
    for side in (encoder, decoder):
        side.scale_embeddings = float(embeddings.input_scale)
        side.position_encodings.encodings = positions
    for layer_spec, layer in zip(encoder.layer, model.encoder.layers, strict=True):
        _set_linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv)
        _set_linear(layer_spec.self_attention.linear[1], layer.self_attn.out)
        _set_norm(layer_spec.self_attention.layer_norm, layer.attn_block.norm)
        _set_ffn(layer_spec.ffn, layer)
    for layer_spec, layer in zip(decoder.layer, model.decoder.layers, strict=True):
        _set_linear(layer_spec.self_attention.linear[0], layer.self_attn.qkv)
        _set_linear(layer_spec.self_attention.linear[1], layer.self_attn.out)
        _set_norm(layer_spec.self_attention.layer_norm, layer.self_block.norm)
        _set_linear(layer_spec.attention.linear[0], layer.cross_attn.q)
        _set_linear(layer_spec.attention.linear[1], layer.cross_attn.kv)
        _set_linear(layer_spec.attention.linear[2], layer.cross_attn.out)
        _set_norm(layer_spec.attention.layer_norm, layer.cross_block.norm)
        _set_ffn(layer_spec.ffn, layer)
    if config.norm == "pre":
        _set_norm(encoder.layer_norm, model.encoder.final_norm)
        _set_norm(decoder.layer_norm, model.decoder.final_norm)

    decoder.projection.weight, decoder.projection.bias = _output_layer(embeddings, matrices)

    spec.register_source_vocabulary(_ctranslate2_tokens(vocab_src))
    spec.register_target_vocabulary(_ctranslate2_tokens(vocab_tgt))
    return spec


def _ctranslate2_tokens(pieces) -> list[str]:
    # CTranslate2 calls its padding token <blank> (the fairseq converter renames it too).
    return ["<blank>" if i == PAD_ID else piece for i, piece in enumerate(pieces)]


def export_ctranslate2(
    checkpoint: str | Path,
    out: str | Path,
    quantization: str = "float32",
    force: bool = False,
    max_positions: int = MAX_POSITIONS,
) -> dict:
    """Write the export directory `out` (atomically: built beside it, then renamed); return
    its metadata. `max_positions` rows of the position table (float32 whatever the
    quantization: 1 MB at width 256 and 1,024 rows) bound the longest source and output."""
    ctranslate2 = require_ctranslate2()
    import torch
    from ctranslate2.converters.converter import Converter

    from nmt_tie.checkpoint import load_model, processors_from

    checkpoint, out = Path(checkpoint), Path(out)
    payload, config = exportable_transformer(checkpoint, out, force, "CTranslate2", is_export(out))
    if max_positions < MIN_POSITIONS:
        raise UserError(
            f"--max-positions {max_positions}: nmt-tie translate needs {MIN_POSITIONS} (a source of up "
            "to 256 pieces and its longest output)"
        )
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    model = load_model(payload).eval()
    vocab = payload["vocab"]
    src, tgt = processors_from(vocab)
    with torch.no_grad():
        spec = transformer_spec(model, config, list(src.vocab.pieces), list(tgt.vocab.pieces), max_positions)

    class _Loaded(Converter):
        def _load(self):
            return spec

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _Loaded().convert(str(tmp), quantization=quantization, force=True)
        spm_files = {"source": "source.spm.model", "target": "target.spm.model"}
        if vocab["joint"]:
            spm_files = {"source": "sentencepiece.model", "target": "sentencepiece.model"}
        (tmp / spm_files["source"]).write_bytes(vocab["spm_src"])
        (tmp / spm_files["target"]).write_bytes(vocab["spm_tgt"])
        metadata = {
            "format": CTRANSLATE2_FORMAT,
            "tie": config.tie,
            "quantization": quantization,
            "max_positions": max_positions,
            "source_checkpoint": str(checkpoint),
            "source_checkpoint_sha256": sha256_of(checkpoint),
            "source_checkpoint_bytes": checkpoint.stat().st_size,
            "projection_folded": model.embeddings.projection is not None,
            "model_config": payload["model_config"],
            "languages": {"source": vocab["src_lang"], "target": vocab["tgt_lang"]},
            "moses": vocab["moses"],
            "sentencepiece": spm_files,
            "ctranslate2_version": ctranslate2.__version__,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _write_model_card(tmp, checkpoint, payload, metadata, model)
        _replace_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


def _write_model_card(directory: Path, checkpoint: Path, payload: dict, metadata: dict, model) -> None:
    """README.md: what the model is, how it was trained and scored, how to translate with it."""
    from nmt_tie.model_card import model_card

    src, tgt = metadata["languages"]["source"], metadata["languages"]["target"]
    usage = [
        "```bash",
        "pip install 'nmt-tie[ctranslate2]'",
        "echo 'A man is riding a bicycle.' | nmt-tie translate -c THIS_DIRECTORY --beam 5",
        "```",
        "",
        "`nmt-tie translate -c THIS_DIRECTORY` takes it as a checkpoint (without PyTorch). CTranslate2 "
        "itself takes it too: `ctranslate2.Translator(THIS_DIRECTORY)` on SentencePiece pieces "
        f"(`{metadata['sentencepiece']['source']}`); it appends the source EOS itself.",
    ]
    notes = [
        f"CTranslate2 {metadata['ctranslate2_version']}, weights in {metadata['quantization']}, a position "
        f"table of {metadata['max_positions']} rows",
        f"source checkpoint SHA-256: `{metadata['source_checkpoint_sha256']}`",
    ]
    title = f"nmt-tie {src}-{tgt} Transformer, {metadata['tie']}-tied, for CTranslate2"
    front = {"language": [src, tgt], "tags": ["translation", "nmt-tie", "ctranslate2"]}
    card = model_card(checkpoint, payload, model, title, usage, notes, front)
    (directory / "README.md").write_text(card, encoding="utf-8")


def exportable_transformer(checkpoint: Path, out: Path, force: bool, engine: str, earlier_export: bool):
    """(payload, model config) of a checkpoint an export may be made of, into `out`: a
    Transformer translation model, and `out` new or (with --force) an earlier export."""
    from nmt_tie.checkpoint import load_checkpoint, model_config_of

    if out.exists() and not force:
        raise UserError(f"{out} exists: give --force to replace it")
    if out.exists() and not earlier_export:
        # --force replaces an earlier export, never a run directory or a checkpoint
        raise UserError(
            f"{out} exists and is not an nmt-tie export, which --force would delete; choose another --out"
        )
    payload = load_checkpoint(checkpoint)
    if payload.get("kind") == "lm":
        raise UserError(f"{checkpoint} is a language model: only translation models are exported")
    config = model_config_of(payload)
    if config.arch != "transformer":
        raise UserError(
            f"{checkpoint} is the paper's RNN (arch: {config.arch}): {engine} has no counterpart "
            "of its conditional GRU; only Transformers are exported"
        )
    return payload, config


def _replace_directory(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is removed only once `new` is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def export_sizes(directory: str | Path) -> dict[str, int]:
    """Bytes on disk: the CTranslate2 weights (`model.bin`) and the whole directory."""
    directory = Path(directory)
    files = [p for p in directory.iterdir() if p.is_file()]
    return {
        "model_bin_bytes": (directory / "model.bin").stat().st_size,
        "directory_bytes": sum(p.stat().st_size for p in files),
    }


COMPUTE_TYPES = {  # --dtype -> CTranslate2 compute type, for float and for int8 exports
    None: ("default", "default"),
    "fp32": ("float32", "int8_float32"),
    "bf16": ("bfloat16", "int8_bfloat16"),
    "fp16": ("float16", "int8_float16"),
}


class ExportedTranslator(TextTranslator):
    """Translation through a CTranslate2 export, with nmt-tie's text handling around it."""

    def __init__(
        self,
        directory: str | Path,
        options: SearchOptions | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int = 0,
        warn=None,
    ):
        ctranslate2 = require_ctranslate2()
        directory = Path(directory)
        metadata = read_metadata(directory)
        options = options or SearchOptions(max_tokens=EXPORT_MAX_TOKENS)
        if options.length_norm != "average":
            raise UserError(
                f"{directory}: CTranslate2 ranks hypotheses by score / length ** lenpen only; "
                "--length-norm gnmt needs the PyTorch checkpoint"
            )
        spm = metadata["sentencepiece"]
        src = TextProcessor(
            metadata["languages"]["source"], (directory / spm["source"]).read_bytes(), metadata["moses"]
        )
        tgt = TextProcessor(
            metadata["languages"]["target"], (directory / spm["target"]).read_bytes(), metadata["moses"]
        )
        super().__init__(src, tgt, options, warn)
        self.metadata = metadata
        # a vocabulary map (vmap.txt) restricts each batch's output layer to its candidates
        self.vocabulary_map = (directory / "vmap.txt").is_file()
        self.max_positions = metadata.get("max_positions", MAX_POSITIONS)
        if self.options.max_src_len + 1 > self.max_positions:
            raise UserError(
                f"--max-src-len {self.options.max_src_len}: {directory} holds positions for "
                f"{self.max_positions} tokens; use at most {self.max_positions - 1}"
            )
        quantized = metadata["quantization"].startswith("int")
        compute_type = COMPUTE_TYPES[dtype][1 if quantized else 0]
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        device_type, _, index = str(device).partition(":")
        if device_type not in ("cpu", "cuda") or not (index.isdigit() or index == ""):
            raise UserError(f"device {device!r}: give auto, cpu, cuda or cuda:N")
        if device_type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise UserError(f"device {device}: CUDA is not available here; use the cpu (or auto)")
        supported = ctranslate2.get_supported_compute_types(device_type, int(index or 0))
        if compute_type != "default" and compute_type not in supported:
            # as the PyTorch path (devices.effective_dtype): a CPU without native bf16 runs fp32
            fallback = COMPUTE_TYPES["fp32"][1 if quantized else 0]
            self.warn(
                f"{directory}: CTranslate2 has no efficient {compute_type} on this {device_type}; "
                f"running {fallback}"
            )
            compute_type = fallback
        self.engine = ctranslate2.Translator(
            str(directory),
            device=device_type,
            device_index=int(index or 0),
            compute_type=compute_type,
            inter_threads=1,
            intra_threads=threads or len(os.sched_getaffinity(0)),
        )

    def translate_ids(self, sources: list[list[int]]) -> list[list[Hypothesis]]:
        """Like the PyTorch search: at most a * (source length + EOS) + b output tokens per
        sentence (CTranslate2 takes one limit per call: the longest sentence's, and longer
        outputs are cut to their own sentence's), and greedy scores are not length-normalized."""
        opts = self.options
        if not sources:
            return []
        # no output longer than the position table (nmt-tie's own limits fit MIN_POSITIONS)
        limits = [
            min(int((len(ids) + 1) * opts.max_len_a + opts.max_len_b), self.max_positions - 1)
            for ids in sources
        ]
        results = self.engine.translate_batch(
            [self.src.pieces(ids) for ids in sources],
            beam_size=opts.beam,
            length_penalty=opts.lenpen if opts.beam > 1 else 0.0,
            num_hypotheses=opts.nbest,
            max_decoding_length=max(limits) + 1,
            max_batch_size=opts.max_tokens,
            batch_type="tokens",
            return_scores=True,
            use_vmap=self.vocabulary_map,
        )
        self.lines_done(len(sources))
        index = self.tgt.vocab.index
        return [
            [
                Hypothesis([index[piece] for piece in pieces[:limit]], score)
                for pieces, score in zip(result.hypotheses, result.scores, strict=True)
            ]
            for result, limit in zip(results, limits, strict=True)
        ]
