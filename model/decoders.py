"""The two caption decoders: their torch modules (training) and their decoding tables.

Both read the encoder's grid of cell features, (B, N, D), and emit one word per step:

- ShowTellDecoder ("baseline", Vinyals et al. 2015): the whole image becomes one vector, which
  sets the LSTM's initial state and is fed again beside every word; there is no attention.
- ShowAttendTellDecoder ("attention", Xu et al. 2015): at every step additive (Bahdanau)
  attention weighs the N cells by their relevance to the LSTM's state; the weighted context,
  scaled by a learned gate, is fed in beside the previous word. The weights are the
  attention maps that the bot draws.

`forward` is the teacher-forced pass used in training. Decoding (greedy, sampling, beam search)
runs without torch in model/decoding.py, from tables that `decoder_tables` exports here: every
projection regrouped by what it reads, so that a decoding step is one table row, the attention
and two matrix products. Its results equal `forward` to float rounding (tests/test_decoders.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.decoding import Tables

State = dict[str, torch.Tensor]  # every tensor's first dimension is the batch


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

    def _inputs(self, words, v):
        e = self.embedding(words)
        return torch.cat([e, v.unsqueeze(1).expand(-1, e.shape[1], -1)], dim=2)

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
# Decoding tables (model/decoding.py): the weights regrouped, in float64 and stored as float32.


def decoder_tables(decoder: ShowTellDecoder | ShowAttendTellDecoder) -> Tables:
    """The decoder's decoding tables, for model/decoding.py's runtimes (which need no torch)."""
    with torch.no_grad():
        p = {
            name: value.detach().cpu().double().numpy()
            for name, value in decoder.state_dict().items()
        }
    exported = (
        _attention_arrays(decoder, p)
        if isinstance(decoder, ShowAttendTellDecoder)
        else _baseline_arrays(decoder, p)
    )
    arrays = {name: np.ascontiguousarray(a, np.float32) for name, a in exported.items()}
    return Tables(decoder.config.to_dict(), arrays)


def _ifog(gates: np.ndarray) -> np.ndarray:
    """An LSTM's gate columns (..., 4H) from torch's i, f, g, o to i, f, o, g, with i, f and o
    halved (model/decoding.py's _lstm: sigmoid(x) = (1 + tanh(x / 2)) / 2)."""
    i, f, g, o = np.split(gates, 4, axis=-1)
    return np.concatenate([i / 2, f / 2, o / 2, g], axis=-1)


def _normalised(p: dict, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """A Linear layer after FeatureNorm, folded into one: (D, out) weight and (out,) bias."""
    w, b = p[f"{prefix}.weight"], p[f"{prefix}.bias"]  # (out, D), (out,)
    scale = 1.0 / p["norm.std"]
    return (w * scale).T, b - w @ (p["norm.mean"] * scale)


def _baseline_arrays(decoder: ShowTellDecoder, p: dict) -> dict[str, np.ndarray]:
    c = decoder.config
    side, layout = decoder.grid_side, decoder.layout_side
    eye = torch.eye(side * side, dtype=torch.float64).view(-1, 1, side, side)
    pool = F.adaptive_avg_pool2d(eye, layout).flatten(1).T.numpy()  # (L*L, N), linear
    reduce1_w, reduce1_b = _normalised(p, "cell_reduce.0")  # pooling and norm commute
    w_ih, embed = p["lstm.weight_ih_l0"], c.embed_dim  # (4H, E + H)
    return {
        "pool": pool,
        "reduce1_w": reduce1_w,  # (D, R)
        "reduce1_b": reduce1_b,
        "reduce2_w": p["cell_reduce.2.weight"].T,  # (R, layout_dim)
        "reduce2_b": p["cell_reduce.2.bias"],
        "image_w": p["image_vector.0.weight"].T,  # (L*L*layout_dim, H)
        "image_b": p["image_vector.0.bias"],
        "init_w": np.concatenate([p["init_h.weight"], p["init_c.weight"]]).T,  # (H, 2H)
        "init_b": np.concatenate([p["init_h.bias"], p["init_c.bias"]]),
        "image_gates": _ifog(w_ih[:, embed:].T),  # (H, 4H)
        "word_gates": _ifog(  # (V, 4H)
            p["embedding.weight"] @ w_ih[:, :embed].T + p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"]
        ),
        "from_h": np.concatenate([_ifog(p["lstm.weight_hh_l0"].T), p["fc.weight"].T], 1),
        "fc_b": p["fc.bias"],  # (V,)
    }


def _attention_arrays(decoder: ShowAttendTellDecoder, p: dict) -> dict[str, np.ndarray]:
    """The output layer is folded into the context's and the word's shares:
    fc(h + W_co ctx + W_wo e) = fc(h) + (fc W_co) ctx + (fc W_wo) e + constants."""
    c = decoder.config
    embed, hidden = c.embed_dim, c.hidden_dim
    words, fc_w = p["embedding.weight"], p["fc.weight"]  # (V, E), (V, H)
    w_ih, w_query = p["lstm.weight_ih"], p["attention.query_proj.weight"]  # (4H, E+C), (A, H+E)
    cells_w, cells_b = _normalised(p, "cell_proj.0")
    word_logits = (
        words @ (fc_w @ p["word_out.weight"]).T
        + p["fc.bias"]
        + fc_w @ (p["word_out.bias"] + p["context_out.bias"])
    )
    return {
        "cells_w": cells_w,  # (D, C)
        "cells_b": cells_b,  # (C,)
        "position": p["position"],  # (N, C)
        "keys_w": p["attention.cell_proj.weight"].T,  # (C, A)
        "keys_b": p["attention.cell_proj.bias"],
        "init_w": np.concatenate([p["init_h.weight"], p["init_c.weight"]]).T,  # (C, 2H)
        "init_b": np.concatenate([p["init_h.bias"], p["init_c.bias"]]),
        "word": np.concatenate(  # (V, 4H + A + V): gates | query | logits
            [
                _ifog(words @ w_ih[:, :embed].T + p["lstm.bias_ih"] + p["lstm.bias_hh"]),
                words @ w_query[:, hidden:].T + p["attention.query_proj.bias"],
                word_logits,
            ],
            axis=1,
        ),
        "from_h": np.concatenate(  # (H, 4H + A + 1 + V): gates | query | gate | logits
            [_ifog(p["lstm.weight_hh"].T), w_query[:, :hidden].T, p["gate.weight"].T, fc_w.T], 1
        ),
        "gate_b": p["gate.bias"],  # (1,)
        "context": np.concatenate(  # (C, 4H + V): gates | logits
            [_ifog(w_ih[:, embed:].T), (fc_w @ p["context_out.weight"]).T], 1
        ),
        # (F, 2, K, K): over the last map, over the sum of past maps
        "location_conv": p["attention.location_conv.weight"],
        "location_w": p["attention.location_proj.weight"].T,  # (F, A)
        "score_w": p["attention.score.weight"][0],  # (A,); its bias cancels in the softmax
    }
