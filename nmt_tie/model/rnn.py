"""The paper's NMT model: a DL4MT/Nematus attention GRU encoder-decoder, layer for layer.

    encoder   bidirectional GRU over source embeddings -> annotations of size 2H
    init      s0 = tanh(W_init * mean of the annotations)
    decoder   conditional GRU: GRU1 on the previous target embedding, MLP (Bahdanau)
              attention over the annotations with its query from GRU1, GRU2 on the context
    output    deep output t = tanh(W1 s + W2 E[y_prev] + W3 c) of size E, then the output
              embedding (V x E) and its own bias, both owned by TiedEmbeddings

Parameters follow Nematus so that sizes match Press & Wolf (2017), Table 8: every GRU has
input weights with a bias (W, Wx; b, bx) and recurrent weights without (U, Ux), and the
attention is W_comb_att (H x 2H), Wc_att (2H x 2H, bias b_att) and U_att (2H x 1, bias c_tt).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nmt_tie.devices import autocast_active
from nmt_tie.model.dropout import dropout

EncoderOut = dict[str, torch.Tensor]
Linear = Callable[[torch.Tensor], torch.Tensor]  # an nn.Linear or a LoopLinear of one
Steps = list[tuple[torch.Tensor, torch.Tensor]]  # (output gradient, input) of each time step


class LoopLinear:
    """A Linear layer applied at every step of a time loop, its weight gradient taken once.

    Autograd computes such a weight's gradient step by step, a small (out, batch) x (batch, in)
    product per step, and adds the T results one by one. Here each step's backward keeps its
    output gradient and input, and one product over all T * batch rows gives the sum: an RNN
    update 1.12-1.14x faster in bf16 on the CPU (1.02x in fp32), and under bf16 autocast the sum is
    rounded once instead of T times. Without gradients (decoding), and in code that
    torch.compile traces, it is the Linear layer itself. One LoopLinear per forward pass: its
    backward consumes the steps it collects.
    """

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.steps: Steps = []  # filled by the backward pass, consumed at its end
        weight = linear.weight
        self.weight = self.bias = None
        if torch.is_grad_enabled() and weight.requires_grad and not torch.compiler.is_compiling():
            device = weight.device.type
            dtype = torch.get_autocast_dtype(device) if autocast_active(device) else weight.dtype
            self.weight = _GradientOverSteps.apply(weight, dtype, self.steps)
            if linear.bias is not None:  # cast once, as autocast does
                self.bias = linear.bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return self.linear(x)
        y = _StepProduct.apply(x.to(self.weight.dtype), self.weight, self.steps)
        return y if self.bias is None else y + self.bias


class _GradientOverSteps(torch.autograd.Function):
    """The weight in the loop's dtype; backward: the sum of the steps' weight gradients."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, dtype: torch.dtype, steps: Steps) -> torch.Tensor:
        ctx.weight_dtype, ctx.steps = weight.dtype, steps
        return weight.to(dtype) if dtype != weight.dtype else weight.view_as(weight)

    @staticmethod
    def backward(ctx, _unused: torch.Tensor):
        # runs after every step's backward: they all take this node's output
        steps = ctx.steps
        grad = torch.cat([g for g, _ in steps]).t() @ torch.cat([x for _, x in steps])
        steps.clear()
        return grad.to(ctx.weight_dtype), None, None


class _StepProduct(torch.autograd.Function):
    """x W^T for one step; backward: the input's gradient now, the weight's left to the end."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, steps: Steps) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.steps = steps
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.steps.append((grad, x))
        return grad @ weight, None, None


class NematusGRU(nn.Module):
    """A GRU whose input projection (W, Wx with b, bx) is applied outside the time loop."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, 3 * hidden_dim)  # [W | Wx], [b | bx]
        self.recurrent = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)  # [U | Ux]
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        for gate in self.recurrent.weight.data.chunk(3, dim=0):
            nn.init.orthogonal_(gate)

    def cell(self, projected_input: torch.Tensor, state: torch.Tensor, recurrent: Linear) -> torch.Tensor:
        """One step from the projected input (batch, 3H) and the previous state (batch, H).

        `recurrent` is `self.recurrent`, or a LoopLinear of it inside a time loop."""
        r_x, z_x, n_x = projected_input.chunk(3, dim=-1)
        r_h, z_h, n_h = recurrent(state).chunk(3, dim=-1)
        reset = torch.sigmoid(r_x + r_h)
        update = torch.sigmoid(z_x + z_h)
        candidate = torch.tanh(n_x + reset * n_h)
        return candidate + update * (state - candidate)  # u*h + (1-u)*candidate


class BiGRUEncoder(nn.Module):
    def __init__(self, emb_dim: int, hidden_dim: int, emb_dropout: float, dropout: float):
        super().__init__()
        self.forward_gru = NematusGRU(emb_dim, hidden_dim)
        self.backward_gru = NematusGRU(emb_dim, hidden_dim)
        self.emb_dropout = emb_dropout
        self.dropout = dropout

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> EncoderOut:
        """emb (batch, src_len, E), mask (batch, src_len) True for real tokens."""
        emb = dropout(emb, self.emb_dropout, self.training)
        fwd_in = self.forward_gru.input_proj(emb)
        bwd_in = self.backward_gru.input_proj(emb)
        keep = mask.unsqueeze(-1).to(fwd_in.dtype)
        batch, length = mask.shape
        fwd = bwd = fwd_in.new_zeros(batch, self.forward_gru.recurrent.in_features)
        fwd_states, bwd_states = [], []
        # unbind, not fwd_in[:, t]: the gradient of T slices is then one stack, where slicing
        # adds T zero-padded full-size gradients (a quarter of an RNN update's time)
        fwd_steps, bwd_steps, keep_steps = fwd_in.unbind(1), bwd_in.unbind(1), keep.unbind(1)
        fwd_recurrent = LoopLinear(self.forward_gru.recurrent)
        bwd_recurrent = LoopLinear(self.backward_gru.recurrent)
        for t in range(length):
            # Padding leaves a state unchanged, so the backward GRU starts at each
            # sentence's last real token with a zero state.
            b = length - 1 - t
            fwd = fwd + keep_steps[t] * (self.forward_gru.cell(fwd_steps[t], fwd, fwd_recurrent) - fwd)
            bwd = bwd + keep_steps[b] * (self.backward_gru.cell(bwd_steps[b], bwd, bwd_recurrent) - bwd)
            fwd_states.append(fwd)
            bwd_states.append(bwd)
        memory = torch.cat([torch.stack(fwd_states, 1), torch.stack(bwd_states[::-1], 1)], -1)
        return {"memory": dropout(memory, self.dropout, self.training), "mask": mask}


class ConditionalGRUDecoder(nn.Module):
    def __init__(self, emb_dim: int, hidden_dim: int, emb_dropout: float, dropout: float, deep_output: bool):
        super().__init__()
        context_dim = 2 * hidden_dim
        self.init_state = nn.Linear(context_dim, hidden_dim)  # ff_state
        self.gru1 = NematusGRU(emb_dim, hidden_dim)
        self.att_query = nn.Linear(hidden_dim, context_dim, bias=False)  # W_comb_att
        self.att_keys = nn.Linear(context_dim, context_dim)  # Wc_att, b_att
        self.att_score = nn.Linear(context_dim, 1)  # U_att, c_tt
        self.gru2 = NematusGRU(context_dim, hidden_dim)  # Wc, Wcx; U_nl, Ux_nl; b_nl, bx_nl
        self.deep_output = deep_output
        if deep_output:
            self.out_state = nn.Linear(hidden_dim, emb_dim)  # ff_logit_lstm
            self.out_prev = nn.Linear(emb_dim, emb_dim)  # ff_logit_prev
            self.out_context = nn.Linear(context_dim, emb_dim)  # ff_logit_ctx
        self.emb_dropout = emb_dropout
        self.dropout = dropout

    def prepare(self, enc: EncoderOut) -> EncoderOut:
        """Add what every step reuses: the projected attention keys and the initial state."""
        memory, mask = enc["memory"], enc["mask"]
        keep = mask.unsqueeze(-1).to(memory.dtype)
        mean = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)
        return {**enc, "keys": self.att_keys(memory), "init": torch.tanh(self.init_state(mean))}

    def attend(self, query_state: torch.Tensor, enc: EncoderOut, att_query: Linear) -> torch.Tensor:
        """MLP attention: context (rows, 2H) for the GRU1 states (rows, H).

        rows = batch * hypotheses per sentence (beam search, next to each other): the
        hypotheses of a sentence share its keys and memory, which are not copied per beam.
        """
        memory = enc["memory"]
        batch = memory.size(0)
        query = att_query(query_state).view(batch, -1, 1, memory.size(-1))
        energy = torch.tanh(enc["keys"].unsqueeze(1) + query)  # (batch, hyps, src_len, 2H)
        scores = self.att_score(energy).squeeze(-1).float()
        scores = scores.masked_fill(~enc["mask"].unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(memory.dtype)
        return torch.bmm(weights, memory).view(query_state.size(0), -1)

    def output(self, state: torch.Tensor, prev_emb: torch.Tensor, context: torch.Tensor):
        if self.deep_output:
            hidden = self.out_state(state) + self.out_prev(prev_emb) + self.out_context(context)
            state = torch.tanh(hidden)
        return dropout(state, self.dropout, self.training)

    def _step_layers(self) -> dict[str, Linear]:
        """The layers every step applies (the teacher-forced loop wraps them in LoopLinears)."""
        return {
            "gru1": self.gru1.recurrent,
            "att_query": self.att_query,
            "gru2_input": self.gru2.input_proj,
            "gru2": self.gru2.recurrent,
        }

    def _advance(self, gru1_input, state, enc, layers: dict[str, Linear]):
        h1 = self.gru1.cell(gru1_input, state, layers["gru1"])
        context = self.attend(h1, enc, layers["att_query"])
        h2 = self.gru2.cell(layers["gru2_input"](context), h1, layers["gru2"])
        return h2, context

    def forward(self, emb: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher forcing: emb (batch, tgt_len, E) -> output vectors (batch, tgt_len, E)."""
        emb = dropout(emb, self.emb_dropout, self.training)
        gru1_inputs = self.gru1.input_proj(emb)  # all steps in one matrix product
        state = enc["init"]
        states, contexts = [], []
        layers = {name: LoopLinear(layer) for name, layer in self._step_layers().items()}
        for gru1_input in gru1_inputs.unbind(1):  # one stack as gradient (see the encoder)
            state, context = self._advance(gru1_input, state, enc, layers)
            states.append(state)
            contexts.append(context)
        return self.output(torch.stack(states, 1), emb, torch.stack(contexts, 1))

    def step(self, emb: torch.Tensor, enc: EncoderOut, cache: dict | None):
        """One incremental step: emb (batch, E) of the previous token -> (batch, E)."""
        if cache is None:  # every hypothesis of a sentence starts from its initial state
            state = enc["init"].repeat_interleave(emb.size(0) // enc["init"].size(0), dim=0)
        else:
            state = cache["state"]
        state, context = self._advance(self.gru1.input_proj(emb), state, enc, self._step_layers())
        return self.output(state, emb, context), {"state": state}
