"""The one place where vocabulary matrices are created and tied.

A model has three vocabulary-sized roles:

| tie       | encoder input | decoder input | decoder output | needs                          |
| --------- | ------------- | ------------- | -------------- | ------------------------------ |
| none      | source        | target        | output         | -                              |
| decoder   | source        | target        | target         | output layer of embedding size |
| src-tgt   | shared        | shared        | output         | one shared vocabulary          |
| all       | shared        | shared        | shared         | both                           |

`TiedEmbeddings` creates one `nn.Parameter` per distinct matrix and hands it to every role
that uses it. Tied roles therefore share one tensor: one gradient (the sum of the roles'
gradients), one optimizer state, one entry in the state dict and on disk. No architecture
creates vocabulary matrices of its own, and nothing re-assigns weights after construction.

Output logits are `h @ W.T + b` with a separate bias `b`. With projection regularization
(Press & Wolf 2017, section 3) a learned square matrix P comes first: `(h @ P + p) @ W.T + b`
(the bias `p` is optional: the authors' PTB code has one), and the loss gets
`projection_reg * ||P||_F^2`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmt_tie.data.tokenizer import PAD_ID
from nmt_tie.devices import autocast_active
from nmt_tie.model.packed import PackedLinear

ROLES = ("encoder_input", "decoder_input", "output")

MATRIX_OF_ROLE: dict[str, dict[str, str]] = {
    "none": {"encoder_input": "source", "decoder_input": "target", "output": "output"},
    "decoder": {"encoder_input": "source", "decoder_input": "target", "output": "target"},
    "src-tgt": {"encoder_input": "shared", "decoder_input": "shared", "output": "output"},
    "all": {"encoder_input": "shared", "decoder_input": "shared", "output": "shared"},
}


class TiedEmbeddings(nn.Module):
    """Owns every vocabulary matrix of a model and says which role uses which.

    Args:
        tie: one of MATRIX_OF_ROLE's keys.
        src_vocab, tgt_vocab: vocabulary sizes (equal when a matrix serves both languages).
        dim: embedding size.
        output_dim: size of the vectors the output embedding multiplies; must equal `dim`
            when the output matrix is tied to an input one (checked by ModelConfig).
        input_scale: factor on looked-up input embeddings (sqrt(dim) for the Transformer).
        init_std: standard deviation of the normal initialization of the matrices.
        init_uniform: instead, initialize uniformly in [-init_uniform, init_uniform].
        projection: add the square projection P before the output embedding, initialized to
            the identity (so training starts from the unprojected model).
        projection_bias: give P a bias vector (initialized to zero).
        roles: the roles the model has; a language model is a decoder without an encoder,
            so it asks for ("decoder_input", "output") only.
        padding_id: the id whose input embedding is zero and gets no gradient; None where
            every id is a word (a language model's id 0 is its most frequent word).
    """

    def __init__(
        self,
        tie: str,
        src_vocab: int,
        tgt_vocab: int,
        dim: int,
        output_dim: int | None = None,
        input_scale: float = 1.0,
        init_std: float = 0.01,
        init_uniform: float | None = None,
        projection: bool = False,
        projection_bias: bool = False,
        roles: tuple[str, ...] = ROLES,
        padding_id: int | None = PAD_ID,
    ):
        super().__init__()
        self.tie = tie
        self.padding_id = padding_id
        self.roles = {role: MATRIX_OF_ROLE[tie][role] for role in roles}
        self.input_scale = input_scale
        output_dim = output_dim or dim
        vocab_of_role = {
            "encoder_input": src_vocab,
            "decoder_input": tgt_vocab,
            "output": tgt_vocab,
        }
        dim_of_role = {"encoder_input": dim, "decoder_input": dim, "output": output_dim}
        self.matrices = nn.ParameterDict()
        for role in roles:
            name = self.roles[role]
            if name in self.matrices:
                if self.matrices[name].shape != (vocab_of_role[role], dim_of_role[role]):
                    raise ValueError(f"tie {tie}: {role} needs a different matrix shape")
                continue
            weight = torch.empty(vocab_of_role[role], dim_of_role[role])
            if init_uniform is not None:
                nn.init.uniform_(weight, -init_uniform, init_uniform)
            else:
                nn.init.normal_(weight, std=init_std)
            if padding_id is not None:
                with torch.no_grad():
                    weight[padding_id].zero_()
            self.matrices[name] = nn.Parameter(weight)
        self.output_bias = nn.Parameter(torch.zeros(tgt_vocab))
        self.projection = nn.Parameter(torch.eye(output_dim)) if projection else None
        has_bias = projection and projection_bias
        self.projection_bias = nn.Parameter(torch.zeros(output_dim)) if has_bias else None
        self.packed_output: PackedLinear | None = None  # set for translation on a CPU
        self.output_with_bias: torch.Tensor | None = None  # likewise (fp32): fold_output_bias_for_cpu

    def weight(self, role: str) -> nn.Parameter:
        """The matrix serving `role` (tied roles get the very same Parameter object)."""
        return self.matrices[self.roles[role]]

    def roles_of(self, matrix: str) -> list[str]:
        return [role for role, name in self.roles.items() if name == matrix]

    def embed(self, role: str, ids: torch.Tensor) -> torch.Tensor:
        """Look up input embeddings (`role` is encoder_input or decoder_input)."""
        vectors = F.embedding(ids, self.weight(role), padding_idx=self.padding_id)
        return vectors * self.input_scale if self.input_scale != 1.0 else vectors

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalized scores over the target vocabulary: (h P + p) W_out^T + b.

        `out` (rows, vocabulary), when given, receives them: search writes every step's
        scores into one buffer instead of a fresh tensor of several MB (see `Ensemble.step`);
        not once the output product is packed (its kernel makes its own output)."""
        if self.projection is not None:
            hidden = hidden @ self.projection
        if self.projection_bias is not None:
            hidden = hidden + self.projection_bias
        if self.packed_output is not None:
            return self.packed_output(hidden)
        weight = self.weight("output")
        if out is None:
            return F.linear(hidden, weight, self.output_bias)
        if hidden.dtype != out.dtype or autocast_active(hidden.device.type):
            # the product in another precision (autocast does not take out=), cast into out
            return out.copy_(F.linear(hidden, weight, self.output_bias))
        if self.output_with_bias is not None and hidden.dtype == self.output_with_bias.dtype:
            ones = F.pad(hidden, (0, 1), value=1.0)  # times the bias column
            return torch.mm(ones, self.output_with_bias.t(), out=out)
        return torch.addmm(self.output_bias, hidden, weight.t(), out=out)

    def pack_output_for_cpu(self, dtype: torch.dtype) -> None:
        """Translation on a CPU: the output product with the output matrix packed once
        (model/packed.py). A copy of it: the model is for inference from then on."""
        self.packed_output = PackedLinear(self.weight("output").detach(), self.output_bias, dtype)

    def fold_output_bias_for_cpu(self) -> None:
        """Translation on a CPU in fp32: the output bias as one more column of a copy of the
        output matrix, the hidden states given a column of ones. addmm first copies the bias
        into every row of the scores, a pass over rows x vocabulary each step (4 ms of a 22 ms
        1,440 x 256 by 256 x 8,000 product); MKL's plain product then overwrites them. Test2016
        on the Intel Xeon, old and new in turn in one process, 6 rounds: beam 5 1.019x and
        1.024x (medians of two runs), greedy 1.011x, the same translations (beam 5 scores bit
        for bit). 8 MB more memory (a copy: the model is for inference from then on)."""
        weight = self.weight("output").detach()
        self.output_with_bias = torch.cat([weight, self.output_bias.detach()[:, None]], dim=1)

    def projection_penalty(self) -> torch.Tensor | None:
        """||P||_F^2, or None without projection regularization."""
        if self.projection is None:
            return None
        return self.projection.float().pow(2).sum()
