"""The language model of Press & Wolf (2017) section 5: a multi-layer LSTM (Zaremba et al.
2014) whose input and output embeddings can be one matrix (`tie: all`), with optional
projection regularization. It is a decoder without an encoder: its vocabulary matrices come
from the same TiedEmbeddings as the translation models, with the roles decoder input and
output only.

    x_t = E[w_t];  h_t = LSTM(x_t, h_{t-1});  logits_t = (h_t P + p) E_out^T + b
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmt_tie.errors import UserError
from nmt_tie.model.dropout import dropout
from nmt_tie.model.embeddings import TiedEmbeddings

LM_ROLES = ("decoder_input", "output")


@dataclass
class LMConfig:
    arch: str = "lstm"  # the only LM architecture
    tie: str = "all"  # none | all: input embedding = output embedding
    emb_dim: int = 200  # embedding size (must equal hidden_dim when tied)
    hidden_dim: int = 200  # LSTM units per layer
    layers: int = 2
    dropout: float = 0.0  # on embeddings, between layers and before the output (Zaremba)
    projection_reg: float = 0.0  # lambda of projection regularization; 0 = no P
    projection_init: str = "identity"  # identity | uniform (in [-init_range, init_range])
    projection_bias: bool = False  # a bias p after P (the authors' code has one)
    init_range: float = 0.1  # uniform initialization in [-init_range, init_range]
    lstm_bias_init: str = "uniform"  # uniform (Zaremba's Torch code) | zero (the TF tutorial's)
    vocab_size: int = 0  # filled in from the training text

    def validate(self) -> None:
        if self.arch != "lstm":
            raise UserError(f"arch: {self.arch!r}: language models are arch: lstm")
        if self.tie not in ("none", "all"):
            raise UserError(f"tie: {self.tie!r}: a language model is tied (all) or not (none)")
        if self.tie == "all" and self.emb_dim != self.hidden_dim:
            raise UserError(
                f"tie: all needs emb_dim == hidden_dim (the LSTM output of size {self.hidden_dim} "
                f"multiplies the embedding matrix of size {self.emb_dim}); make them equal or use tie: none"
            )
        if self.projection_init not in ("identity", "uniform"):
            raise UserError(f"projection_init: {self.projection_init!r}: use identity or uniform")
        if self.lstm_bias_init not in ("uniform", "zero"):
            raise UserError(f"lstm_bias_init: {self.lstm_bias_init!r}: use uniform or zero")
        if self.vocab_size <= 0:
            raise UserError("the vocabulary size is unknown: give train_text")


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = TiedEmbeddings(
            tie="decoder" if config.tie == "all" else "none",  # decoder input = output
            src_vocab=config.vocab_size,
            tgt_vocab=config.vocab_size,
            dim=config.emb_dim,
            output_dim=config.hidden_dim,
            init_uniform=config.init_range,
            projection=config.projection_reg > 0,
            projection_bias=config.projection_bias,
            roles=LM_ROLES,
            padding_id=None,  # every id is a word: no padding in a stream of text
        )
        self.lstm = nn.LSTM(
            config.emb_dim,
            config.hidden_dim,
            config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        for name, param in self.lstm.named_parameters():
            if name.startswith("bias") and config.lstm_bias_init == "zero":
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -config.init_range, config.init_range)
        # Zaremba et al. (and the paper's code) initialize every weight uniformly; P may start
        # as the identity instead, which makes the untrained model equal the one without P.
        uniform = [self.embeddings.output_bias, self.embeddings.projection_bias]
        if config.projection_init == "uniform":
            uniform.append(self.embeddings.projection)
        with torch.no_grad():
            for param in uniform:
                if param is not None:
                    param.uniform_(-config.init_range, config.init_range)

    def initial_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.config.layers, batch, self.config.hidden_dim)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """tokens (batch, steps) -> logits (batch, steps, vocab) and the final (h, c)."""
        x = dropout(self.embeddings.embed("decoder_input", tokens), self.config.dropout, self.training)
        output, state = self.lstm(x, state)
        output = dropout(output, self.config.dropout, self.training)
        return self.embeddings.logits(output), state

    def projection_penalty(self) -> torch.Tensor | None:
        return self.embeddings.projection_penalty()
