"""The encoder-decoder every architecture plugs into, and the model builder.

    logits = embeddings.logits(decoder(embed(target prefix), prepare(encoder(embed(source)))))

The vocabulary matrices (and their tying) belong to `TiedEmbeddings`; encoders and decoders
only ever see vectors. Three entry points: `forward` (teacher forcing, training), `encode`
then `decode_step` (incremental generation), and `reorder` (beam search).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from nmt_tie.config import ModelConfig
from nmt_tie.data.tokenizer import PAD_ID
from nmt_tie.model.embeddings import TiedEmbeddings
from nmt_tie.model.packed import pack_linear_layers, packing_available
from nmt_tie.model.rnn import BiGRUEncoder, ConditionalGRUDecoder
from nmt_tie.model.transformer import KeyValueCache, TransformerDecoder, TransformerEncoder


class EncoderDecoder(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        embeddings: TiedEmbeddings,
        encoder: nn.Module,
        decoder: nn.Module,
    ):
        super().__init__()
        self.config = config
        self.embeddings = embeddings
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """src (batch, src_len) ids -> everything the decoder needs, batch first."""
        mask = src != PAD_ID
        enc = self.encoder(self.embeddings.embed("encoder_input", src), mask)
        return self.decoder.prepare(enc)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor | None = None):
        """Teacher forcing: logits (batch, tgt_len, vocab) for every target position, or
        (n, vocab) for n selected positions: training skips the output layer at padding, the
        largest matrix product of a step. `positions` is a boolean (batch, tgt_len) mask or
        the flat indices of the selected positions (computed on the CPU, they select without
        a host-device synchronization)."""
        enc = self.encode(src)
        hidden = self.decoder(self.embeddings.embed("decoder_input", tgt_in), enc)
        if positions is not None:
            if positions.dtype == torch.bool:
                hidden = hidden[positions]
            else:
                hidden = hidden.flatten(0, 1).index_select(0, positions)
        return self.embeddings.logits(hidden)

    def decode_step(
        self, enc: dict, prev_tokens: torch.Tensor, cache: dict | None, out: torch.Tensor | None = None
    ):
        """Logits (rows, vocab) for the next token after `prev_tokens` (rows,), and the cache.

        rows may be a multiple of the encoder's batch: that many hypotheses per sentence, next
        to each other (beam search), all attending to their sentence's encoder output. The
        logits are written into `out` (rows, vocab) when given, unless the output product is
        packed (`pack_for_cpu_inference`)."""
        hidden, cache = self.decoder.step(self.embeddings.embed("decoder_input", prev_tokens), enc, cache)
        return self.embeddings.logits(hidden, out), cache

    def compile_decoding(self) -> bool:
        """Decode through a torch.compile'd step of the Transformer's decoder layers from now
        on (`TransformerDecoder.compile_step`); returns whether it did (not for the RNN:
        it decodes eagerly)."""
        if not isinstance(self.decoder, TransformerDecoder):
            return False
        self.decoder.compile_step()
        return True

    @property
    def fills_out(self) -> bool:
        """Whether `decode_step` writes into the `out` it is given: not once the output
        product is packed (its kernel makes its own output)."""
        return self.embeddings.packed_output is None

    @staticmethod
    def reorder(tree: Any, index: torch.Tensor) -> Any:
        """Select batch rows `index` in every tensor of an encoder output or decoder cache."""
        if isinstance(tree, torch.Tensor):
            return tree.index_select(0, index)
        if isinstance(tree, KeyValueCache):
            return tree.reorder(index)
        if isinstance(tree, dict):
            return {key: EncoderDecoder.reorder(value, index) for key, value in tree.items()}
        if isinstance(tree, list):
            return [EncoderDecoder.reorder(value, index) for value in tree]
        return tree

    def projection_penalty(self) -> torch.Tensor | None:
        return self.embeddings.projection_penalty()

    def pack_for_cpu_inference(self, dtype: torch.dtype) -> bool:
        """Pack the Transformer's linear layers and the output product for translation on a
        CPU (model/packed.py); returns whether it did (not without PyTorch's oneDNN kernel).
        The model is for inference from then on. The RNN keeps its linear layers (its time
        loop reads their weights)."""
        if not packing_available():
            return False
        for part in (self.encoder, self.decoder):
            if isinstance(part, (TransformerEncoder, TransformerDecoder)):
                pack_linear_layers(part, dtype)
        self.embeddings.pack_output_for_cpu(dtype)
        return True


def build_model(config: ModelConfig) -> EncoderDecoder:
    """The model a config describes, with its tying in place from construction on."""
    config.validate()
    transformer = config.arch == "transformer"
    embeddings = TiedEmbeddings(
        tie=config.tie,
        src_vocab=config.src_vocab_size,
        tgt_vocab=config.tgt_vocab_size,
        dim=config.emb_dim,
        output_dim=config.output_dim,
        input_scale=config.embedding_scale,
        init_std=config.embedding_init_std,
        projection=config.projection_reg > 0,
    )
    if transformer:
        pre_norm = config.norm == "pre"
        layer_args = (
            config.heads,
            config.ffn_dim,
            config.dropout,
            config.attention_dropout,
            pre_norm,
        )
        encoder = TransformerEncoder(config.emb_dim, config.enc_layers, *layer_args)
        decoder = TransformerDecoder(config.emb_dim, config.dec_layers, *layer_args)
    else:
        encoder = BiGRUEncoder(config.emb_dim, config.hidden_dim, config.emb_dropout, config.dropout)
        decoder = ConditionalGRUDecoder(
            config.emb_dim,
            config.hidden_dim,
            config.emb_dropout,
            config.dropout,
            config.deep_output,
        )
    return EncoderDecoder(config, embeddings, encoder, decoder)


def configure_for_data(config: ModelConfig, prepared) -> ModelConfig:
    """Fill in the vocabulary sizes from a prepared directory.

    The vocabularies count as shared only when their pieces are identical, in order: two
    different vocabularies of equal size must never share a matrix by index.
    """
    src_vocab = prepared.processor("src").vocab
    tgt_vocab = prepared.processor("tgt").vocab
    return dataclasses.replace(
        config,
        src_vocab_size=len(src_vocab),
        tgt_vocab_size=len(tgt_vocab),
        shared_vocab=src_vocab == tgt_vocab,
    )
