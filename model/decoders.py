"""The two caption decoders and the decoding algorithms they share.

Both read the encoder's grid of cell features, (B, N, D), and emit one word per step:

- ShowTellDecoder ("baseline", Vinyals et al. 2015): the whole image becomes one vector, which
  sets the LSTM's initial state and is fed again beside every word; there is no attention.
- ShowAttendTellDecoder ("attention", Xu et al. 2015): at every step additive (Bahdanau)
  attention weighs the N cells by their relevance to the LSTM's state; the weighted context,
  scaled by a learned gate, is fed in beside the previous word. The weights are the
  attention maps that the bot draws.

Every decoder exposes the same incremental interface,

    state = decoder.start(grid)                        # grid (B, N, D)
    logits, state, alpha = decoder.step(words, state)  # words (B,) -> logits (B, V),
                                                       #   alpha (B, N) | None

so greedy decoding, sampling and beam search (below) are written once, run one LSTM step per
token (never re-running the prefix), and decode many images or many samples of one image in a
single batch. `forward` is the teacher-forced pass used in training.

When decoding (eval mode, no gradients) `start` also precomputes what every step would otherwise
recompute, and `step` takes a fused path: the word's share of every projection (LSTM gates, the
attention query, the output layer) is one row of a table built from the weights, so a step is one
row lookup, the attention, and two matrix products (the context's projections, and the new state's,
which gives this step's logits and the next step's gates together) where it was ten. Its results
equal the teacher-forced pass to float rounding (tests/test_decoders.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

State = dict[str, torch.Tensor]  # every tensor's first dimension is the batch
MAX_LEN = 20  # words a caption may have at inference (and in validation)


@dataclass
class DecoderConfig:
    kind: str = "attention"  # "attention" | "baseline"
    vocab_size: int = 0
    feature_dim: int = 488  # D: the encoder's cell features
    num_cells: int = 196  # N: 14x14
    embed_dim: int = 128
    hidden_dim: int = 384
    attention_dim: int = 128  # 256 trained no better here and 35 % slower over 196 cells
    cell_dim: int = 384  # cell features are projected to this width before use
    layout_dim: int = 24  # baseline: per-cell width of the layout-keeping pooled vector
    layout_hidden: int = 256  # baseline: hidden width of the small network that reduces each cell
    layout_side: int = 7  # baseline: the grid is first averaged down to at most 7x7 cells
    dropout: float = 0.3
    alpha_c: float = 0.1  # weight of the doubly stochastic attention regulariser
    location_filters: int = 8  # attention: channels of the convolution over past attention maps

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureNorm(nn.Module):
    """Standardises each feature with training-set statistics.

    The grid mixes CNN activations (up to ~6) with colour fractions (~0.01): without this the
    colour evidence starts out drowned. The statistics are buffers saved with the weights.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, sample: torch.Tensor) -> None:
        flat = sample.reshape(-1, sample.shape[-1]).float()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-3))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid.float() - self.mean) / self.std


def _decoding(module: nn.Module) -> bool:
    """Inference: the fused decoding path applies (it has no gradients and no dropout)."""
    return not module.training and not torch.is_grad_enabled()


def _decoding_weights(module: nn.Module, build) -> dict[str, torch.Tensor]:
    """`build()`'s weights, rearranged for decoding from the module's parameters, kept until a
    parameter changes (an optimiser step or load_state_dict bumps its version; .to() its
    address)."""
    key = tuple((p.data_ptr(), p._version) for p in module.parameters())
    cached = module.__dict__.get("_decoding_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        module.__dict__["_decoding_cache"] = cached
    return cached[1]


def _lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell's update from its summed gate pre-activations (B, 4H), in torch's i, f, g, o
    order."""
    hidden = c.shape[1]
    gate = torch.sigmoid(gates)  # i, f, -, o (the g quarter is wasted, one op for three)
    c = torch.addcmul(
        gate[:, hidden : 2 * hidden] * c,
        gate[:, :hidden],
        torch.tanh(gates[:, 2 * hidden : 3 * hidden]),
    )
    return gate[:, 3 * hidden :] * torch.tanh(c), c


class ShowTellDecoder(nn.Module):
    """Baseline: one vector for the whole image, no attention.

    The vector sets the LSTM's initial (h, c), as in Show and Tell, and is also fed beside every
    word (as in LRCN): measured here, with the initial state alone the decoder learned to use the
    image about ten times more slowly (validation loss 1.07 against 0.58 after four epochs).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        self.norm = FeatureNorm(c.feature_dim)
        # The "pooled vector" is a learned pooling that keeps the layout: each cell is reduced to a
        # few numbers and the cells are concatenated in raster order. A plain mean over cells would
        # erase where things are, and with it every left/right/above/below. The reduction is a small
        # two-layer network, not one linear map: 24 numbers must say which colour goes with which
        # shape in the cell. With a single layer the baseline reached 0.70 validation exact match;
        # with a hidden layer of 128, 0.74; of 256, 0.76. tanh rather than ReLU: a ReLU layer here
        # died early in training (the language model's large first gradients), after which every
        # image gave the same initial state. Measured: on the 14x14 grid this vector (4,704 numbers)
        # overfitted, 8 points below the same decoder on the grid averaged to 7x7; attention is what
        # needs the fine grid.
        self.grid_side = math.isqrt(c.num_cells)
        self.layout_side = min(self.grid_side, c.layout_side)
        self.cell_reduce = nn.Sequential(
            nn.Linear(c.feature_dim, c.layout_hidden),
            nn.Tanh(),
            nn.Linear(c.layout_hidden, c.layout_dim),
            nn.Tanh(),
        )
        self.image_vector = nn.Sequential(
            nn.Linear(self.layout_side**2 * c.layout_dim, c.hidden_dim),
            nn.Tanh(),
            nn.Dropout(c.dropout),
        )
        self.init_h = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.init_c = nn.Linear(c.hidden_dim, c.hidden_dim)
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.lstm = nn.LSTM(c.embed_dim + c.hidden_dim, c.hidden_dim, batch_first=True)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden_dim, c.vocab_size)

    def _initial(self, grid: torch.Tensor) -> State:
        cells = self.norm(grid)  # (B, N, D)
        if self.layout_side != self.grid_side:  # -> (B, L*L, D)
            square = cells.transpose(1, 2).unflatten(2, (self.grid_side, self.grid_side))
            cells = F.adaptive_avg_pool2d(square, self.layout_side).flatten(2).transpose(1, 2)
        cells = self.cell_reduce(cells)  # (B, L*L, layout_dim)
        v = self.image_vector(cells.flatten(1))  # (B, H)
        return {"v": v, "h": torch.tanh(self.init_h(v)), "c": torch.tanh(self.init_c(v))}

    def start(self, grid: torch.Tensor) -> State:
        state = self._initial(grid)
        if _decoding(
            self
        ):  # the image's share of the gates once per image, the first step's h share
            w = self._weights()
            state["image_gates"] = F.linear(state["v"], w["image_gates"])  # (B, 4H)
            state["from_h"] = F.linear(state["h"], w["from_h"])  # (B, V + 4H)
        return state

    def _weights(self) -> dict[str, torch.Tensor]:
        def build():
            embed = self.config.embed_dim
            lstm = dict(self.lstm.named_parameters())  # weight_ih_l0, bias_hh_l0, ...
            w_ih = lstm["weight_ih_l0"]
            return {
                "word_gates": self.embedding.weight @ w_ih[:, :embed].T
                + lstm["bias_ih_l0"]
                + lstm["bias_hh_l0"],  # (V, 4H)
                "image_gates": w_ih[:, embed:].contiguous(),  # (4H, H)
                "from_h": torch.cat([self.fc.weight, lstm["weight_hh_l0"]]),  # (V + 4H, H)
            }

        return _decoding_weights(self, build)

    def _inputs(self, words, v):
        e = self.embedding(words)
        return torch.cat([e, v.unsqueeze(1).expand(-1, e.shape[1], -1)], dim=2)

    def step(self, words: torch.Tensor, state: State):
        if "from_h" in state:
            return self._fused_step(words, state)
        x = self._inputs(words.unsqueeze(1), state["v"])  # (B, 1, E+H)
        out, (h, c) = self.lstm(x, (state["h"].unsqueeze(0), state["c"].unsqueeze(0)))
        logits = self.fc(self.dropout(out.squeeze(1)))  # (B, V)
        return logits, {"v": state["v"], "h": h.squeeze(0), "c": c.squeeze(0)}, None

    def _fused_step(self, words: torch.Tensor, state: State):
        """`step` when decoding: one table row, one matrix product (logits and next gates at
        once)."""
        w, vocab = self._weights(), self.config.vocab_size
        gates = (
            w["word_gates"].index_select(0, words)
            + state["image_gates"]
            + state["from_h"][:, vocab:]
        )
        h, c = _lstm_cell(gates, state["c"])
        from_h = F.linear(h, w["from_h"])  # (B, V + 4H)
        logits = from_h[:, :vocab] + self.fc.bias
        return logits, {**state, "h": h, "c": c, "from_h": from_h}, None

    def forward(self, grid: torch.Tensor, inputs: torch.Tensor):
        """Teacher forcing. inputs (B, T) starting with <bos> -> logits (B, T, V), alphas None.

        One call of the fused LSTM over the whole sequence; `step` runs the same LSTM one token
        at a time, and a test checks the two agree.
        """
        state = self._initial(grid)
        out, _ = self.lstm(
            self._inputs(inputs, state["v"]), (state["h"].unsqueeze(0), state["c"].unsqueeze(0))
        )
        return self.fc(self.dropout(out)), None


class AdditiveAttention(nn.Module):
    """Bahdanau attention, location-aware (Chorowski et al. 2015):

        score_i = w . tanh(W_c cell_i + W_q query + W_l where_i),   alpha = softmax(score)

    query: the LSTM's state and the word just written. Without the word, the step that writes
    "circle" after "red" chose where to look before it saw "red", and the colours and shapes of
    neighbouring objects got swapped.
    where_i: a small convolution over two maps around cell i, the previous step's attention and
    the attention summed so far. The first keeps a colour word and its shape word on one object;
    the second marks objects already described, which were otherwise described twice ("two
    green crosses" for a green cross and a green triangle) while the third went missing.
    """

    LOCATION_KERNEL = 5  # cells: wide enough to cover a small object on the 14x14 grid

    def __init__(self, cell_dim: int, query_dim: int, attention_dim: int, location_filters: int):
        super().__init__()
        self.cell_proj = nn.Linear(cell_dim, attention_dim)
        self.query_proj = nn.Linear(query_dim, attention_dim)
        self.location_conv = nn.Conv2d(
            2, location_filters, self.LOCATION_KERNEL, padding=self.LOCATION_KERNEL // 2, bias=False
        )
        self.location_proj = nn.Linear(location_filters, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1)

    def keys(self, cells: torch.Tensor) -> torch.Tensor:
        """The cells' half of the score, computed once per image. (B, N, C) -> (B, N, A)"""
        return self.cell_proj(cells)

    def forward(
        self,
        cells: torch.Tensor,
        keys: torch.Tensor,
        query: torch.Tensor,
        previous: torch.Tensor,
        coverage: torch.Tensor,
    ):
        side = math.isqrt(cells.shape[1])
        maps = torch.stack([previous, coverage], dim=1).unflatten(2, (side, side))  # (B, 2, S, S)
        where = self.location_conv(maps).flatten(2).transpose(1, 2)  # (B, N, F)
        energy = keys + self.query_proj(query).unsqueeze(1) + self.location_proj(where)  # (B, N, A)
        alpha = self.score(torch.tanh(energy)).squeeze(2).softmax(dim=1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), cells).squeeze(1)  # (B, C)
        return context, alpha


class ShowAttendTellDecoder(nn.Module):
    """LSTM with soft attention over the grid at every step."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        self.norm = FeatureNorm(c.feature_dim)
        self.cell_proj = nn.Sequential(nn.Linear(c.feature_dim, c.cell_dim), nn.ReLU())
        # Where each cell is. CNN features hardly say it, and without it the decoder cannot tell
        # "left of" from "right of" nor keep apart two objects it has already looked at.
        self.position = nn.Parameter(torch.randn(c.num_cells, c.cell_dim) * 0.02)
        self.attention = AdditiveAttention(
            c.cell_dim, c.hidden_dim + c.embed_dim, c.attention_dim, c.location_filters
        )
        self.init_h = nn.Linear(c.cell_dim, c.hidden_dim)
        self.init_c = nn.Linear(c.cell_dim, c.hidden_dim)
        self.gate = nn.Linear(c.hidden_dim, 1)  # beta: a learned scalar gate on the context
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.lstm = nn.LSTMCell(c.embed_dim + c.cell_dim, c.hidden_dim)
        # The paper's "deep output": the word is read from the new state, the attended context
        # and the previous word together, so a shape word comes straight from the cells being
        # looked at (without it, colours and shapes of neighbouring objects got swapped).
        self.context_out = nn.Linear(c.cell_dim, c.hidden_dim)
        self.word_out = nn.Linear(c.embed_dim, c.hidden_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden_dim, c.vocab_size)

    def _initial(self, grid: torch.Tensor) -> State:
        cells = self.cell_proj(self.norm(grid)) + self.position  # (B, N, C)
        mean_cell = cells.mean(dim=1)  # (B, C)
        no_attention = cells.new_zeros(cells.shape[:2])  # (B, N)
        return {
            "cells": cells,
            "keys": self.attention.keys(cells),
            "h": torch.tanh(self.init_h(mean_cell)),
            "c": torch.tanh(self.init_c(mean_cell)),
            "alpha": no_attention,
            "coverage": no_attention,
        }

    def start(self, grid: torch.Tensor) -> State:
        state = self._initial(grid)
        if _decoding(
            self
        ):  # keys laid out (B, A, N) and doubled for the fused step; the first step's h share
            state["keys"] = state["keys"].transpose(1, 2).mul(2.0)
            state["from_h"] = F.linear(state["h"], self._weights()["from_h"])
        return state

    def _weights(self) -> dict[str, torch.Tensor]:
        """Every projection regrouped by what it reads: the previous word (a table), the new state
        h, the attended context. The output layer is folded into the context's and the word's shares
        (fc(h + W_co ctx + W_wo e) = fc(h) + (fc W_co) ctx + (fc W_wo) e).

        The attention's energy is doubled (keys, query, location weights) so that its tanh is a
        sigmoid: w . tanh(e) + b = 2w . sigmoid(2e) + (b - sum w), and the constant drops out of
        the softmax. torch's sigmoid is several times faster than its tanh on the CPUs measured,
        and this is the step's largest elementwise pass (A x N per caption)."""

        def build():
            embed, hidden = self.config.embed_dim, self.config.hidden_dim
            lstm, query, fc = self.lstm, self.attention.query_proj, self.fc
            words = self.embedding.weight  # (V, E)
            return {
                "word": torch.cat(
                    [
                        words @ lstm.weight_ih[:, :embed].T
                        + lstm.bias_ih
                        + lstm.bias_hh,  # gates (4H)
                        words @ (fc.weight @ self.word_out.weight).T
                        + fc.bias
                        + fc.weight @ (self.word_out.bias + self.context_out.bias),  # logits (V)
                        2 * (words @ query.weight[:, hidden:].T + query.bias),  # query (A), doubled
                    ],
                    dim=1,
                ),
                "from_h": torch.cat(
                    [fc.weight, lstm.weight_hh, 2 * query.weight[:, :hidden], self.gate.weight]
                ),  # (V + 4H + A + 1, H)
                "context": torch.cat(
                    [lstm.weight_ih[:, embed:], fc.weight @ self.context_out.weight]
                ),  # (4H + V, C)
                "location": 2
                * self.attention.location_proj.weight.unsqueeze(0),  # (1, A, F), doubled
                "score": 2 * self.attention.score.weight.unsqueeze(0),  # (1, 1, A), doubled
            }

        return _decoding_weights(self, build)

    def _advance(self, embedded: torch.Tensor, state: State):
        query = torch.cat([state["h"], embedded], dim=1)  # (B, H+E)
        context, alpha = self.attention(
            state["cells"], state["keys"], query, state["alpha"], state["coverage"]
        )  # (B, C), (B, N)
        beta = torch.sigmoid(self.gate(state["h"]))  # (B, 1)
        context = beta * context
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (state["h"], state["c"]))
        deep = h + self.context_out(context) + self.word_out(embedded)  # (B, H)
        state = {**state, "h": h, "c": c, "alpha": alpha, "coverage": state["coverage"] + alpha}
        return self.fc(self.dropout(deep)), state, alpha

    def step(self, words: torch.Tensor, state: State):
        if "from_h" in state:
            return self._fused_step(words, state)
        return self._advance(self.embedding(words), state)

    def _fused_step(self, words: torch.Tensor, state: State):
        """`_advance` when decoding, regrouped (see _weights); equal to float rounding."""
        w, c = self._weights(), self.config
        four_h, vocab = 4 * c.hidden_dim, c.vocab_size
        word = w["word"].index_select(0, words)  # (B, 4H + V + A)
        from_h = state["from_h"]  # (B, V + 4H + A + 1)
        query = from_h[:, vocab + four_h : -1] + word[:, four_h + vocab :]  # (B, A)
        batch, cells = state["alpha"].shape
        side = math.isqrt(cells)
        maps = torch.stack([state["alpha"], state["coverage"]], dim=1).unflatten(2, (side, side))
        where = self.attention.location_conv(maps).flatten(2)  # (B, F, N)
        # keys + W_l where + query in one product: the query rides as an extra column against ones
        # (each (B, A, N) temporary is a pass over memory; at a batch of 32 this halved the step).
        energy = torch.baddbmm(
            state["keys"],
            torch.cat([w["location"].expand(batch, -1, -1), query.unsqueeze(2)], dim=2),
            torch.cat([where, where.new_ones(batch, 1, cells)], dim=1),
        )  # (B, A, N), doubled
        alpha = torch.matmul(w["score"], energy.sigmoid_()).squeeze(1).softmax(dim=1)  # (B, N)
        context = torch.bmm(alpha.unsqueeze(1), state["cells"]).squeeze(1)  # (B, C)
        beta = torch.sigmoid(from_h[:, -1:] + self.gate.bias)  # (B, 1)
        from_context = F.linear(context, w["context"]) * beta  # (B, 4H + V)
        gates = word[:, :four_h] + from_h[:, vocab : vocab + four_h] + from_context[:, :four_h]
        h, cell = _lstm_cell(gates, state["c"])
        from_h = F.linear(h, w["from_h"])
        logits = from_h[:, :vocab] + from_context[:, four_h:] + word[:, four_h : four_h + vocab]
        state = {
            **state,
            "h": h,
            "c": cell,
            "from_h": from_h,
            "alpha": alpha,
            "coverage": state["coverage"] + alpha,
        }
        return logits, state, alpha

    def forward(self, grid: torch.Tensor, inputs: torch.Tensor):
        """Teacher forcing. inputs (B, T) -> logits (B, T, V), alphas (B, T, N)."""
        state = self._initial(grid)
        embedded = self.embedding(inputs)  # (B, T, E), all at once
        logits, alphas = [], []
        for t in range(inputs.shape[1]):
            step_logits, state, alpha = self._advance(embedded[:, t], state)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)

    def regulariser(self, alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Doubly stochastic attention: over a caption, every cell should receive about one
        unit of attention in total, so that no part of the image is ignored throughout."""
        total = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, N)
        return self.config.alpha_c * ((1.0 - total) ** 2).mean()


def build_decoder(config: DecoderConfig) -> ShowTellDecoder | ShowAttendTellDecoder:
    Decoder = type[ShowTellDecoder] | type[ShowAttendTellDecoder]
    kinds: dict[str, Decoder] = {
        "attention": ShowAttendTellDecoder,
        "baseline": ShowTellDecoder,
    }
    if config.kind not in kinds:
        raise ValueError(f"unknown decoder kind {config.kind!r}; choose from {sorted(kinds)}")
    return kinds[config.kind](config)


def save_decoder(decoder, path: str | Path) -> None:
    """The checkpoint format model/captioner.py's load_decoder reads: {"config", "state_dict"}."""
    torch.save({"config": decoder.config.to_dict(), "state_dict": decoder.state_dict()}, path)


# ----------------------------------------------------------------------------------------------
# Decoding. Results are token ids without <bos>/<eos>; alphas are (T, N) per caption or None.


def _never(logits: torch.Tensor, banned: tuple[int, ...]) -> torch.Tensor:
    """Words a caption may not contain (<pad>, <bos>, <unk>) get zero probability."""
    return (
        logits.index_fill(1, torch.tensor(banned, device=logits.device), float("-inf"))
        if banned
        else logits
    )


def _select(state: State, index: torch.Tensor) -> State:
    return {name: tensor.index_select(0, index) for name, tensor in state.items()}


@torch.no_grad()
def sample(
    decoder,
    grid: torch.Tensor,
    bos: int,
    eos: int,
    max_len: int = 20,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool | torch.Tensor = False,
    generator: torch.Generator | None = None,
    banned: tuple[int, ...] = (),
    rows: torch.Tensor | None = None,
):
    """Greedy or ancestral sampling, all captions in one batch.

    rows: the image (row of grid) each caption reads, e.g. [0, 0, 0, 1, 1, 1] for three samples
    of two images; the decoder starts once per image. Default: one caption per row of grid.
    greedy: True, False, or a bool per caption, so that greedy captions and samples decode
    together (the samples draw from the generator as they would alone when the greedy rows come
    first).
    Returns (ids, alphas): one entry per caption; alphas[b] is a (T, N) tensor or None for
    decoders without attention.
    """
    state = decoder.start(grid)
    if rows is not None:
        state = _select(state, rows)
    batch = len(rows) if rows is not None else grid.shape[0]
    if not isinstance(greedy, bool):
        sampled = (~greedy).nonzero().squeeze(1)  # rows that sample
        if len(sampled) in (0, batch):
            greedy = len(sampled) == 0
    words = torch.full((batch,), bos, dtype=torch.long, device=grid.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=grid.device)
    banned = tuple(banned) + (bos,)
    tokens, maps = [], []
    for _ in range(max_len):
        logits, state, alpha = decoder.step(words, state)
        logits = _never(logits, banned)
        if greedy is True:
            words = logits.argmax(dim=1)
        elif greedy is False:
            words = _draw(logits, temperature, top_k, generator)
        else:
            words = logits.argmax(dim=1).index_copy_(
                0, sampled, _draw(logits.index_select(0, sampled), temperature, top_k, generator)
            )
        words = words.masked_fill(finished, eos)
        tokens.append(words)
        maps.append(alpha)
        finished |= words == eos
        if finished.all():
            break
    words_of: list[list[int]] = torch.stack(tokens, 1).tolist()  # (B, T)
    stacked = torch.stack(maps, 1) if maps[0] is not None else None  # (B, T, N)
    ids, alphas = [], []
    for b in range(batch):
        length = words_of[b].index(eos) if eos in words_of[b] else len(words_of[b])
        ids.append(words_of[b][:length])
        alphas.append(stacked[b, :length].cpu() if stacked is not None else None)
    return ids, alphas


def _draw(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One word per row, drawn from softmax(logits / temperature), within the top k if given."""
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def beam_search(
    decoder,
    grid: torch.Tensor,
    bos: int,
    eos: int,
    width: int = 3,
    max_len: int = 20,
    banned: tuple[int, ...] = (),
):
    """Beam search of `width` for each image of the batch, all beams in one batch of B*width.

    Scores are summed log-probabilities; a hypothesis that emits <eos> is set aside. Returns
    (ids, alphas) like `sample`: the best finished hypothesis per image (or the best unfinished
    one when none finished within max_len).
    """
    batch, device = grid.shape[0], grid.device
    state = decoder.start(grid)
    # Start with one live beam per image (the others at -inf) so the first step does not pick
    # `width` copies of the same word.
    rows = torch.arange(batch, device=device).repeat_interleave(width)
    state = _select(state, rows)
    scores = torch.full((batch, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    words = torch.full((batch * width,), bos, dtype=torch.long, device=device)
    history = torch.zeros(batch * width, 0, dtype=torch.long, device=device)  # (B*K, t)
    alpha_history = None  # (B*K, t, N)
    best: list[tuple[float, list[int], torch.Tensor | None]] = [(float("-inf"), [], None)] * batch
    banned = tuple(banned) + (bos,)

    for _ in range(max_len):
        logits, state, alpha = decoder.step(words, state)
        vocab = logits.shape[1]
        total = scores.view(-1, 1) + _never(logits, banned).log_softmax(dim=1)  # (B*K, V)
        top_scores, top_index = total.view(batch, -1).topk(width, dim=1)  # (B, K)
        parent = top_index // vocab + torch.arange(batch, device=device).unsqueeze(1) * width
        parent, words = parent.view(-1), (top_index % vocab).view(-1)
        history = torch.cat([history.index_select(0, parent), words.unsqueeze(1)], dim=1)
        if alpha is not None:
            step_alpha = alpha.index_select(0, parent).unsqueeze(1)
            alpha_history = (
                step_alpha
                if alpha_history is None
                else torch.cat([alpha_history.index_select(0, parent), step_alpha], dim=1)
            )
        state = _select(state, parent)
        scores = top_scores.clone()
        ended = (words == eos).view(batch, width)
        for b, k in ended.nonzero().tolist():
            if scores[b, k] > best[b][0]:
                row = b * width + k
                best[b] = (
                    scores[b, k].item(),
                    history[row, :-1].tolist(),
                    alpha_history[row, :-1].cpu() if alpha_history is not None else None,
                )
        scores = scores.masked_fill(ended, float("-inf"))
        # An image is done when its best finished score beats every live beam (scores only fall).
        live_best = scores.max(dim=1).values
        if all(best[b][0] >= live_best[b].item() for b in range(batch)):
            break

    ids, alphas = [], []
    for b in range(batch):
        if best[b][0] == float("-inf"):  # nothing finished: take the best live beam
            row = b * width + int(scores[b].argmax())
            best[b] = (
                0.0,
                history[row].tolist(),
                alpha_history[row].cpu() if alpha_history is not None else None,
            )
        ids.append(best[b][1])
        alphas.append(best[b][2])
    return ids, alphas
