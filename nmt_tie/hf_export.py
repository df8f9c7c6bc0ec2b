"""Export a Transformer checkpoint to Hugging Face transformers (and so to its Hub).

The directory loads with `AutoModelForSeq2SeqLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, without `trust_remote_code` and without nmt-tie, and
computes what nmt-tie computes. The mapping, read off transformers' own model code:

- post-norm -> `MarianMTModel` (post-norm layers, no final layer norms, ReLU,
  `scale_embedding`, the output bias as `final_logits_bias`); pre-norm ->
  `PegasusForConditionalGeneration` (pre-norm layers with final layer norms);
- attention: nmt-tie's fused query/key/value matrices are split into `q_proj`, `k_proj`,
  `v_proj`; feed-forward `up`/`down` are `fc1`/`fc2`; LayerNorm eps 1e-5 on both sides;
- positions: nmt-tie's sinusoids are [sin | cos] with frequencies 10000^(-i / (d/2 - 1)),
  Marian's and Pegasus' 10000^(-2i / d). The tables are weights of the model, so nmt-tie's
  table (512 positions by default) is written into model.safetensors, which transformers loads.
  Marian leaves its table out when *saving* (`_keys_to_ignore_on_save`): a model loaded from
  this export and saved again with `save_pretrained` or `push_to_hub` would get Marian's own
  table back and translate differently, so the model card says to upload the directory as
  it is. Pegasus saves its table;
- tying: Marian shares one matrix between encoder, decoder and output
  (`share_encoder_decoder_embeddings`, `tie_word_embeddings`) or the decoder's input and
  output only, so `tie: all` and `tie: decoder` are stored once and `tie: none` as three
  matrices. Pegasus ties all three or none: its untied and decoder-tied exports store each
  role's matrix apart (and Pegasus' own `shared` matrix besides), the export says how much
  more that is;
- projection regularization's `(h P + p) W^T + b` is folded into `lm_head` exactly, as for
  CTranslate2 (`h (W P^T)^T + (W p + b)`); the output matrix is then stored apart.

Every export checks itself before it is renamed into place: the transformers model, loaded
back from the directory, must give nmt-tie's logits within 1e-4 on random sentences, or
nothing is written. The tokenizer is `MarianTokenizer` over nmt-tie's SentencePiece model(s)
with the vocabulary written out piece by piece, so its ids are nmt-tie's (it appends the
source EOS nmt-tie trains with). `generation_config.json` reproduces nmt-tie's beam search:
beam and `length_penalty` with the same meaning (score / length ** lenpen, the length
counting EOS), a sentence done once `beam` hypotheses ended (`early_stopping: true`), PAD and
BOS never generated, BOS the decoder's first input. What it cannot reproduce is nmt-tie's
per-sentence length limit (a * source length + b): generate takes one limit per call.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from nmt_tie.artifacts import HUGGINGFACE_FORMAT, METADATA_FILE
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from nmt_tie.errors import UserError

# Rows of the position tables (the longest source or output): enough for nmt-tie's own limits
# (sources of 256 pieces, outputs of 1.5 x 257 + 10), 1 MB less per table than 1,024 at width 256.
POSITIONS = 512
TOLERANCE = 1e-4  # largest difference of a logit allowed by the export's self-check
CONFIG_CLASSES = {"MarianMTModel": "MarianConfig", "PegasusForConditionalGeneration": "PegasusConfig"}


def require_transformers():
    try:
        import safetensors  # noqa: F401
        import transformers
    except ImportError:
        raise UserError(
            "transformers is not installed: pip install 'nmt-tie[huggingface]' (or pip install transformers)"
        ) from None
    return transformers


def pegasus_keeps_separate_embeddings() -> bool:
    """transformers 5 gives Pegasus' encoder and decoder embedding matrices of their own (tied to
    `shared` only with tie_word_embeddings); 4.x hands both the `shared` module itself."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def _layer_names(prefix: str, ours: str, decoder: bool) -> dict[str, tuple[str, slice | None]]:
    """HF name -> (nmt-tie name, rows of it) for one layer."""
    names: dict[str, tuple[str, slice | None]] = {}

    def split(hf_stem: str, our_linear: str, parts: list[str]) -> None:
        for index, part in enumerate(parts):
            for kind in ("weight", "bias"):
                names[f"{prefix}.{hf_stem}.{part}_proj.{kind}"] = (
                    f"{ours}.{our_linear}.{kind}",
                    (index, len(parts)),
                )

    def copy(hf: str, our: str) -> None:
        for kind in ("weight", "bias"):
            names[f"{prefix}.{hf}.{kind}"] = (f"{ours}.{our}.{kind}", None)

    split("self_attn", "self_attn.qkv", ["q", "k", "v"])
    copy("self_attn.out_proj", "self_attn.out")
    copy("fc1", "ffn.up")
    copy("fc2", "ffn.down")
    copy("final_layer_norm", "ffn_block.norm")
    if decoder:
        copy("self_attn_layer_norm", "self_block.norm")
        split("encoder_attn", "cross_attn.q", ["q"])
        split("encoder_attn", "cross_attn.kv", ["k", "v"])
        copy("encoder_attn.out_proj", "cross_attn.out")
        copy("encoder_attn_layer_norm", "cross_block.norm")
    else:
        copy("self_attn_layer_norm", "attn_block.norm")
    return names


def _rows(tensor, part: tuple[int, int] | None):
    if part is None:
        return tensor
    index, parts = part
    size = tensor.size(0) // parts
    return tensor[index * size : (index + 1) * size]


def output_layer(embeddings):
    """(weight, bias) of logits = h W^T + b, with the projection P folded in if there is one;
    the weight is the output role's own Parameter when there is none (so ties can hold)."""
    import torch

    weight = embeddings.weight("output")
    bias = embeddings.output_bias.detach().float().clone()
    if embeddings.projection is None:
        return weight, bias
    with torch.no_grad():
        if embeddings.projection_bias is not None:
            bias += weight.float() @ embeddings.projection_bias.float()
        return weight.float() @ embeddings.projection.float().T, bias


def hf_layout(model, config, positions: int = POSITIONS) -> tuple[str, dict, dict, list[str]]:
    """(transformers class name, config kwargs, {HF name: tensor}, notes) for an nmt-tie
    Transformer; tensors of tied HF parameters are given once, under the name HF loads."""
    import torch

    from nmt_tie.model.transformer import sinusoidal_positions

    embeddings = model.embeddings
    ours = model.state_dict()
    pre_norm = config.norm == "pre"
    source, target = embeddings.weight("encoder_input"), embeddings.weight("decoder_input")
    output, bias = output_layer(embeddings)
    encoder_shares = source is target
    output_is_decoder = output is target
    notes: list[str] = []
    state: dict[str, torch.Tensor] = {}
    common = {
        "d_model": config.emb_dim,
        "encoder_layers": config.enc_layers,
        "decoder_layers": config.dec_layers,
        "encoder_attention_heads": config.heads,
        "decoder_attention_heads": config.heads,
        "encoder_ffn_dim": config.ffn_dim,
        "decoder_ffn_dim": config.ffn_dim,
        "activation_function": "relu",
        "dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "activation_dropout": 0.0,
        "max_position_embeddings": positions,
        "scale_embedding": embeddings.input_scale != 1.0,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": BOS_ID,
        "forced_eos_token_id": None,
        "vocab_size": source.size(0),
        "is_encoder_decoder": True,
    }
    if embeddings.input_scale not in (1.0, math.sqrt(config.emb_dim)):
        raise UserError(
            f"input embeddings scaled by {embeddings.input_scale}: transformers scales by sqrt(d) or 1"
        )
    megabytes = source.numel() * 4 / 1e6
    if pre_norm:
        class_name = "PegasusForConditionalGeneration"
        if source.size(0) != target.size(0) or source.size(0) != output.size(0):
            raise UserError(
                "Pegasus (pre-norm) has one vocabulary for source and target: a pre-norm model on two "
                "vocabularies of different sizes has no transformers counterpart; re-prepare with a joint one"
            )
        tied_all = encoder_shares and output_is_decoder
        if not encoder_shares and not pegasus_keeps_separate_embeddings():
            import transformers

            raise UserError(
                f"transformers {transformers.__version__}: Pegasus (pre-norm) shares one embedding "
                f"between encoder and decoder before transformers 5; this tie: {config.tie} model has two: "
                "export it with transformers >= 5"
            )
        common["tie_word_embeddings"] = tied_all
        if tied_all:
            state["model.shared.weight"] = source
        else:
            state["model.shared.weight"] = target
            state["model.encoder.embed_tokens.weight"] = source
            state["model.decoder.embed_tokens.weight"] = target
            state["lm_head.weight"] = output
            ours_count = len({id(source), id(target), id(output)})
            notes.append(
                f"Pegasus ties all of its vocabulary matrices or none: this model's are stored apart, "
                f"with Pegasus' own `shared` matrix besides (4 matrices of {megabytes:.1f} MB where nmt-tie "
                f"has {ours_count})"
            )
        state["model.encoder.layer_norm.weight"] = ours["encoder.final_norm.weight"]
        state["model.encoder.layer_norm.bias"] = ours["encoder.final_norm.bias"]
        state["model.decoder.layer_norm.weight"] = ours["decoder.final_norm.weight"]
        state["model.decoder.layer_norm.bias"] = ours["decoder.final_norm.bias"]
    else:
        class_name = "MarianMTModel"
        common["decoder_vocab_size"] = target.size(0)
        share = encoder_shares and output_is_decoder
        common["share_encoder_decoder_embeddings"] = share
        common["tie_word_embeddings"] = output_is_decoder
        if share:
            state["model.shared.weight"] = source
        else:
            state["model.encoder.embed_tokens.weight"] = source
            state["model.decoder.embed_tokens.weight"] = target
            if not output_is_decoder:
                state["lm_head.weight"] = output
            if encoder_shares:
                notes.append(
                    f"Marian shares the encoder's matrix with the decoder only together with the output "
                    f"layer: this model's shared input matrix is stored twice ({megabytes:.1f} MB more)"
                )
    if embeddings.projection is not None:
        notes.append(
            "projection P folded into lm_head: the output matrix is stored apart from the embeddings"
        )
    state["final_logits_bias"] = bias.unsqueeze(0)
    table = sinusoidal_positions(positions, config.emb_dim)
    state["model.encoder.embed_positions.weight"] = table
    state["model.decoder.embed_positions.weight"] = table.clone()
    for side, count, decoder in (("encoder", config.enc_layers, False), ("decoder", config.dec_layers, True)):
        for i in range(count):
            names = _layer_names(f"model.{side}.layers.{i}", f"{side}.layers.{i}", decoder)
            for hf_name, (our_name, part) in names.items():
                state[hf_name] = _rows(ours[our_name], part)
    return class_name, common, state, notes


def export_huggingface(
    checkpoint: str | Path,
    out: str | Path,
    beam: int = 5,
    lenpen: float = 1.0,
    force: bool = False,
    max_positions: int = POSITIONS,
) -> dict:
    """Write the transformers directory `out` (built beside it, checked, then renamed)."""
    transformers = require_transformers()
    # its bars for writing and loading the weights (transformers 5) would sit above the export's
    # own one-line summary: the export takes a second
    transformers.utils.logging.disable_progress_bar()
    import torch
    from safetensors.torch import load_file, save_file

    from nmt_tie.checkpoint import load_model
    from nmt_tie.deploy import _replace_directory, exportable_transformer, sha256_of

    checkpoint, out = Path(checkpoint), Path(out)
    payload, config = exportable_transformer(
        checkpoint, out, force, "transformers", (out / METADATA_FILE).is_file()
    )
    vocab = payload["vocab"]
    if vocab["moses"]:
        raise UserError(
            f"{checkpoint} was trained on Moses-tokenized text (prepare --moses): transformers' tokenizers "
            "cannot apply Moses' steps; re-prepare without --moses to export"
        )
    if beam < 1:
        raise UserError(f"--beam {beam}: need at least 1")
    from nmt_tie.deploy import MIN_POSITIONS

    if max_positions < MIN_POSITIONS:
        raise UserError(f"--max-positions {max_positions}: nmt-tie's own limits need {MIN_POSITIONS}")
    model = load_model(payload).eval()
    with torch.no_grad():
        class_name, settings, state, notes = hf_layout(model, config, max_positions)
    model_class = getattr(transformers, class_name)
    hf_config = getattr(transformers, CONFIG_CLASSES[class_name])(**settings)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_model = model_class(hf_config)
        # missing names are the tied ones (and any mistake, which the self-check below catches)
        _, unexpected = hf_model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if unexpected:
            raise UserError(f"{checkpoint}: {class_name} has no weights named {', '.join(unexpected[:3])}")
        hf_model.save_pretrained(tmp, safe_serialization=True)
        weights = tmp / "model.safetensors"
        stored = load_file(weights)
        for name in ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"):
            stored.setdefault(name, state[name].float().contiguous())  # Marian leaves them out
        save_file(stored, weights, metadata={"format": "pt"})
        _write_tokenizer(tmp, vocab, max_positions)
        _write_generation_config(tmp, beam, lenpen)
        difference = _self_check(model, tmp, transformers)
        if not difference <= TOLERANCE:
            raise UserError(
                f"{checkpoint}: the transformers model does not reproduce nmt-tie's logits (largest "
                f"difference {difference:.2e} > {TOLERANCE:g}); not exported"
            )
        metadata = {
            "format": HUGGINGFACE_FORMAT,
            "transformers_class": class_name,
            "transformers_version": transformers.__version__,
            "tie": config.tie,
            "source_checkpoint": str(checkpoint),
            "source_checkpoint_sha256": sha256_of(checkpoint),
            "source_checkpoint_bytes": checkpoint.stat().st_size,
            "projection_folded": model.embeddings.projection is not None,
            "model_config": payload["model_config"],
            "languages": {"source": vocab["src_lang"], "target": vocab["tgt_lang"]},
            "largest_logit_difference": difference,
            "search": {"beam": beam, "lenpen": lenpen},
            "notes": notes,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        from nmt_tie.model_card import write_model_card

        write_model_card(tmp, checkpoint, payload, metadata, model)
        _replace_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metadata


def _write_tokenizer(directory: Path, vocab: dict, positions: int) -> None:
    """MarianTokenizer files: the SentencePiece model(s) and every piece with nmt-tie's id."""
    from nmt_tie.checkpoint import processors_from

    src, tgt = processors_from(vocab)
    (directory / "source.spm").write_bytes(vocab["spm_src"])
    (directory / "target.spm").write_bytes(vocab["spm_tgt"])
    (directory / "vocab.json").write_text(
        json.dumps({piece: i for i, piece in enumerate(src.vocab.pieces)}, ensure_ascii=False),
        encoding="utf-8",
    )
    separate = not vocab["joint"]
    if separate:
        (directory / "target_vocab.json").write_text(
            json.dumps({piece: i for i, piece in enumerate(tgt.vocab.pieces)}, ensure_ascii=False),
            encoding="utf-8",
        )
    pieces = src.vocab.pieces
    settings = {
        "tokenizer_class": "MarianTokenizer",
        "source_lang": vocab["src_lang"],
        "target_lang": vocab["tgt_lang"],
        "separate_vocabs": separate,
        "unk_token": pieces[UNK_ID],
        "eos_token": pieces[EOS_ID],
        "pad_token": pieces[PAD_ID],
        "model_max_length": positions,
        # "<pad>", "</s>" typed in a sentence are text to nmt-tie's SentencePiece, not specials
        "split_special_tokens": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _write_generation_config(directory: Path, beam: int, lenpen: float) -> None:
    from transformers import GenerationConfig

    from nmt_tie.hypotheses import SearchOptions

    defaults = SearchOptions()
    generation = GenerationConfig(
        num_beams=beam,
        do_sample=False,
        length_penalty=lenpen,
        early_stopping=True,
        # one limit per call: nmt-tie's for its longest input (max_src_len pieces and EOS)
        max_length=int(defaults.max_len_a * (defaults.max_src_len + 1) + defaults.max_len_b) + 1,
        decoder_start_token_id=BOS_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bad_words_ids=[[PAD_ID], [BOS_ID]],
        forced_eos_token_id=None,
    )
    generation.save_pretrained(directory)


def _self_check(model, directory: Path, transformers, sentences: int = 4, seed: int = 0) -> float:
    """The largest |logit difference| between nmt-tie and the exported model, teacher-forced on
    random sentences of random lengths (padded: the masks count too)."""
    import torch

    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    generator = torch.Generator().manual_seed(seed)
    vocab_src = model.embeddings.weight("encoder_input").size(0)
    vocab_tgt = model.embeddings.weight("decoder_input").size(0)
    src_lengths = torch.randint(2, 24, (sentences,), generator=generator)
    tgt_lengths = torch.randint(2, 24, (sentences,), generator=generator)
    src = torch.randint(4, vocab_src, (sentences, int(src_lengths.max())), generator=generator)
    tgt = torch.randint(4, vocab_tgt, (sentences, int(tgt_lengths.max())), generator=generator)
    src_mask = torch.arange(src.size(1))[None, :] < src_lengths[:, None]
    tgt_mask = torch.arange(tgt.size(1))[None, :] < tgt_lengths[:, None]
    src = src.masked_fill(~src_mask, PAD_ID)
    tgt = tgt.masked_fill(~tgt_mask, PAD_ID)
    tgt[:, 0] = BOS_ID
    with torch.no_grad():
        ours = model(src, tgt).float()
        theirs = loaded(
            input_ids=src,
            attention_mask=src_mask.long(),
            decoder_input_ids=tgt,
            decoder_attention_mask=tgt_mask.long(),
        ).logits.float()
    return float((ours - theirs)[tgt_mask].abs().max())
