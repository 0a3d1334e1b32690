"""Decoding without torch: both decoders' steps in numpy, and greedy decoding, sampling and beam
search written once over them.

A decoder's decoding tables (`Tables`: its DecoderConfig as a dict and plain float32 arrays) are
exported from the trained torch module by model/decoders.py's `decoder_tables` and can be saved
to and loaded from an .npz file, so a serving process decodes without importing torch (506 MB of
RSS on its own). Every runtime has the same incremental interface,

    state = runtime.start(grid, rows)            # grid (I, N, D) float32, rows (B,): image per row
    logits, alpha = runtime.step(words, state)   # words (B,) -> logits (B, V), alpha (B, N) | None
    state = runtime.select(state, index)         # (beam search) keep/reorder rows of one image

`step` updates `state` in place. The tables regroup every projection by what it reads (the
previous word: a table row; the previous state h; the attended context), so that a step is one
row lookup, the attention and two matrix products (model/decoders.py describes the folding). The
results equal the teacher-forced torch pass to float rounding (tests/test_decoders.py).

Matrix products with a weight matrix go through ONNX Runtime's MLAS (a one-node MatMul model
per weight matrix, its constant right-hand side packed once), where onnxruntime is importable,
else numpy. Measured on the 2-core AMD EPYC (AVX-512) of issue 13, one thread, (B, 384) @
(384, 1706): MLAS 33 / 39 / 60 us at B = 1 / 6 / 8; numpy's OpenBLAS 32 / 168 / 141 us (its
small-M kernels are slow, and B = 6 slower than B = 8), torch's MKL 32 / 146 / 156 us.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Arrays = dict[str, np.ndarray]
State = dict[str, np.ndarray]  # per-row arrays have the batch first
MAX_LEN = 20  # words a caption may have at inference (and in validation)
_CONFIG = "__config__"  # the config's name in a tables .npz


@dataclass
class Tables:
    """A decoder's decoding tables: `config` is its DecoderConfig as a dict (kind, sizes)."""

    config: dict
    arrays: Arrays


def save_tables(tables: Tables, path: str | Path) -> None:
    arrays: dict = {_CONFIG: np.array(json.dumps(tables.config)), **tables.arrays}
    np.savez(path, **arrays)


def load_tables(path: str | Path) -> Tables:
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files if name != _CONFIG}
        return Tables(json.loads(str(saved[_CONFIG])), arrays)


# ----------------------------------------------------------------------------------------------
# Products with a constant weight matrix


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, text or bytes length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _matmul_model(w: np.ndarray) -> bytes:
    """An ONNX model of one MatMul, y (B, O) = x (B, K) @ w (K, O), w a constant; encoded by
    hand (ModelProto's field numbers) so that serving needs no `onnx` package (17 MB of RSS)."""

    def value(name: str, dims: tuple[str | int, ...]) -> bytes:  # ValueInfoProto, float
        shape = b"".join(_field(1, _field(2 if isinstance(d, str) else 1, d)) for d in dims)
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))

    k, o = w.shape
    tensor = _field(1, k) + _field(1, o) + _field(2, 1) + _field(8, "w") + _field(9, w.tobytes())
    node = _field(1, "x") + _field(1, "w") + _field(2, "y") + _field(4, "MatMul")
    graph = (
        _field(1, node)
        + _field(2, "product")
        + _field(5, tensor)
        + _field(11, value("x", ("B", k)))
        + _field(12, value("y", ("B", o)))
    )
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 13))  # IR 8, opset 13


class Product:
    """x (B, K) -> x @ w (B, O) for one weight matrix w (K, O): by MLAS where onnxruntime is
    importable and `mlas`, else numpy."""

    def __init__(self, w: np.ndarray, mlas: bool = True):
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self._session = _session(_matmul_model(self.w)) if mlas else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            return x @ self.w
        return self._session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


def _session(model: bytes):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a product this small splits poorly; callers run in parallel
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------
# The two decoders' steps


def _lstm(gates: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An LSTM cell's update from its gate pre-activations (B, 4H), laid out i, f, o, g with the
    i, f, o quarters halved by the tables: sigmoid(x) = (1 + tanh(x / 2)) / 2, so one tanh serves
    all four gates. Overwrites `gates`."""
    hidden = c.shape[1]
    t = np.tanh(gates, out=gates)
    s = t[:, : 3 * hidden]  # (B, 3H): i, f, o
    s *= 0.5
    s += 0.5
    c = s[:, hidden : 2 * hidden] * c + s[:, :hidden] * t[:, 3 * hidden :]
    return s[:, 2 * hidden :] * np.tanh(c), c


def _softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in place."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class BaselineRuntime:
    """ShowTellDecoder's steps: one image vector sets the LSTM's state and is fed at every step."""

    per_row = ("image_gates", "c", "from_h")

    def __init__(self, tables: Tables, mlas: bool = True):
        self.config, a = tables.config, tables.arrays
        self.a = a
        self.hidden = self.config["hidden_dim"]
        self.from_h = Product(a["from_h"], mlas)  # h (B, H) -> (B, 4H + V): gates | logits
        self.reduce = Product(a["reduce1_w"], mlas)  # (I*L*L, D) -> (I*L*L, R)

    def start(self, grid: np.ndarray, rows: np.ndarray | None = None) -> State:
        """grid (I, N, D) -> state for rows (B,) of images (default: one row per image)."""
        a, hidden = self.a, self.hidden
        pooled = np.matmul(a["pool"], grid)  # (L*L, N) @ (I, N, D) -> (I, L*L, D)
        cells = self.reduce(pooled.reshape(-1, pooled.shape[2])) + a["reduce1_b"]  # (I*L*L, R)
        cells = np.tanh(np.tanh(cells, out=cells) @ a["reduce2_w"] + a["reduce2_b"])
        v = np.tanh(cells.reshape(len(grid), -1) @ a["image_w"] + a["image_b"])  # (I, H)
        hc = np.tanh(v @ a["init_w"] + a["init_b"])  # (I, 2H): h | c
        if rows is not None:
            v, hc = v[rows], hc[rows]
        return {
            "image_gates": v @ a["image_gates"],  # (B, 4H)
            "c": np.ascontiguousarray(hc[:, hidden:]),  # (B, H)
            "from_h": self.from_h(hc[:, :hidden]),  # (B, 4H + V)
        }

    def step(self, words: np.ndarray, state: State) -> tuple[np.ndarray, None]:
        four_h = 4 * self.hidden
        from_h = state["from_h"]
        gates = self.a["word_gates"][words] + state["image_gates"] + from_h[:, :four_h]
        h, state["c"] = _lstm(gates, state["c"])
        state["from_h"] = from_h = self.from_h(h)
        return from_h[:, four_h:] + self.a["fc_b"], None  # (B, V)

    def select(self, state: State, index: np.ndarray) -> State:
        return {name: state[name][index] for name in self.per_row}


class AttentionRuntime:
    """ShowAttendTellDecoder's steps: location-aware additive attention, gated context."""

    per_row = ("c", "from_h", "alpha", "covered")

    def __init__(self, tables: Tables, mlas: bool = True):
        self.config, a = tables.config, tables.arrays
        self.a = a
        self.hidden, self.attention = self.config["hidden_dim"], self.config["attention_dim"]
        self.side = int(round(self.config["num_cells"] ** 0.5))
        self.kernel = int(round(len(a["location_taps"]) ** 0.5))
        self.filters = a["location_w"].shape[0]
        # h (B, H) -> (B, 4H + A + 1 + V): gates | query | gate | logits
        self.from_h = Product(a["from_h"], mlas)
        self.context = Product(a["context"], mlas)  # (B, C) -> (B, 4H + V): gates | logits
        self.cells = Product(a["cells_w"], mlas)  # (I*N, D) -> (I*N, C)
        self.keys = Product(a["keys_w"], mlas)  # (I*N, C) -> (I*N, A)

    def start(self, grid: np.ndarray, rows: np.ndarray | None = None) -> State:
        """grid (I, N, D) -> state for rows (B,) of images (default: one row per image). The
        cells and keys are kept once per image when all rows read one image."""
        a, hidden = self.a, self.hidden
        images, cells_n = len(grid), self.side**2
        cells = self.cells(grid.reshape(images * cells_n, -1)) + a["cells_b"]  # (I*N, C)
        np.maximum(cells, 0.0, out=cells)
        cells = cells.reshape(images, cells_n, -1) + a["position"]  # (I, N, C)
        keys = self.keys(cells.reshape(images * cells_n, -1)) + a["keys_b"]
        keys = keys.reshape(images, cells_n, -1)  # (I, N, A)
        hc = np.tanh(cells.mean(axis=1) @ a["init_w"] + a["init_b"])  # (I, 2H): h | c
        if rows is not None:
            hc = hc[rows]
            one = np.all(rows == rows[0])
            cells, keys = (cells[rows[:1]], keys[rows[:1]]) if one else (cells[rows], keys[rows])
        batch, pad = len(hc), self.kernel // 2
        return {
            "cells": cells,  # (B or 1, N, C)
            "keys": keys,  # (B or 1, N, A)
            "c": np.ascontiguousarray(hc[:, hidden:]),  # (B, H)
            "from_h": self.from_h(hc[:, :hidden]),  # (B, 4H + A + 1 + V)
            "alpha": np.zeros((batch, self.side**2), np.float32),  # the last attention map
            # the location filters' coverage share: their response to the sum of past maps
            "covered": np.zeros((batch, self.side**2, self.filters), np.float32),  # (B, N, F)
            "padded": np.zeros((batch, self.side + 2 * pad, self.side + 2 * pad), np.float32),
        }

    def step(self, words: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray]:
        a, four_h, attention = self.a, 4 * self.hidden, self.attention
        word = a["word"][words]  # (B, 4H + A + V): gates | query | logits
        from_h = state["from_h"]  # (B, 4H + A + 1 + V)
        pre = from_h[:, : four_h + attention] + word[:, : four_h + attention]  # gates | query
        energy = self._location(state)  # (B, N, A)
        energy += state["keys"]
        energy += pre[:, None, four_h:]
        np.tanh(energy, out=energy)
        alpha = _softmax(energy @ a["score_w"])  # (B, N); the score's bias cancels
        beta = 1.0 / (1.0 + np.exp(-(from_h[:, four_h + attention] + a["gate_b"])))  # (B,)
        context = self._attend(alpha, state["cells"]) * beta[:, None]  # (B, C)
        from_context = self.context(context)  # (B, 4H + V)
        gates = pre[:, :four_h] + from_context[:, :four_h]
        h, state["c"] = _lstm(gates, state["c"])
        state["from_h"] = from_h = self.from_h(h)
        state["alpha"] = alpha
        logits = from_h[:, four_h + attention + 1 :] + from_context[:, four_h:]
        logits += word[:, four_h + attention :]
        return logits, alpha

    def _location(self, state: State) -> np.ndarray:
        """The location filters over the last map and the sum of past maps, projected: (B, N, A).
        Convolution is linear, so the sum's response is kept as a running sum of the maps'
        responses and only the last map is convolved: one (B*N, K*K) @ (K*K, 2F) product."""
        alpha, padded, covered = state["alpha"], state["padded"], state["covered"]
        batch, side, pad = len(alpha), self.side, self.kernel // 2
        padded[:, pad : pad + side, pad : pad + side] = alpha.reshape(batch, side, side)
        taps = sliding_window_view(padded, (self.kernel, self.kernel), axis=(1, 2))
        response = taps.reshape(batch * side * side, -1) @ self.a["location_taps"]  # (B*N, 2F)
        response = response.reshape(batch, side * side, 2 * self.filters)
        covered += response[:, :, self.filters :]
        where = response[:, :, : self.filters] + covered  # (B, N, F)
        energy = where.reshape(-1, self.filters) @ self.a["location_w"]  # (B*N, A)
        return energy.reshape(batch, side * side, self.attention)

    @staticmethod
    def _attend(alpha: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """alpha (B, N), cells (B or 1, N, C) -> (B, C)."""
        if len(cells) == 1:
            return alpha @ cells[0]
        return np.matmul(alpha[:, None, :], cells)[:, 0]

    def select(self, state: State, index: np.ndarray) -> State:
        """Rows `index` of the state; each must stay on its image (beam search's parents do)."""
        selected = {name: state[name][index] for name in (*self.per_row, "padded")}
        return {**state, **selected}


Runtime = BaselineRuntime | AttentionRuntime


def runtime(tables: Tables, mlas: bool = True) -> Runtime:
    kind = tables.config["kind"]
    if kind == "baseline":
        return BaselineRuntime(tables, mlas)
    if kind == "attention":
        return AttentionRuntime(tables, mlas)
    raise ValueError(f"unknown decoder kind {kind!r}; choose from ['attention', 'baseline']")


# ----------------------------------------------------------------------------------------------
# Decoding, written once for both runtimes. Results are token ids without <bos>/<eos>; alphas
# are one (T, N) array per caption, or None for decoders without attention.


def decode(
    runtime: Runtime,
    grid: np.ndarray,
    bos: int,
    eos: int,
    max_len: int = MAX_LEN,
    *,
    greedy: bool | np.ndarray = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: np.random.Generator | None = None,
    banned: tuple[int, ...] = (),
    rows: np.ndarray | None = None,
) -> tuple[list[list[int]], list[np.ndarray | None]]:
    """Greedy decoding or ancestral sampling, all captions in one batch.

    grid (I, N, D) float32. rows: the image each caption reads, e.g. [0, 0, 0, 1, 1, 1] for three
    samples of two images (the runtime starts once per image); default one caption per image.
    greedy: True, False, or a bool per caption, so that greedy captions and samples decode
    together: the sampling rows draw from `rng` as they would alone (every step draws one number
    per sampling row, finished or not).
    """
    state = runtime.start(grid, rows)
    batch = len(rows) if rows is not None else len(grid)
    sampled = np.flatnonzero(~np.broadcast_to(np.asarray(greedy, bool), (batch,)))  # (S,)
    rng = rng if rng is not None else np.random.default_rng()
    never = np.array(sorted({*banned, bos}), dtype=np.intp)
    words = np.full(batch, bos, dtype=np.intp)
    finished = np.zeros(batch, dtype=bool)
    tokens, maps = [], []
    for _ in range(max_len):
        logits, alpha = runtime.step(words, state)  # (B, V), (B, N) | None
        logits[:, never] = -np.inf
        words = logits.argmax(axis=1)
        if len(sampled):
            words[sampled] = _draw(logits[sampled], temperature, top_k, rng)
        words[finished] = eos
        tokens.append(words)
        maps.append(alpha)
        finished |= words == eos
        if finished.all():
            break
    return _captions(np.stack(tokens, axis=1), maps, eos)


def _captions(tokens: np.ndarray, maps: list, eos: int):
    """tokens (B, T) -> ids up to <eos>, and each caption's (T, N) maps (or None)."""
    stacked = np.stack(maps, axis=1) if maps[0] is not None else None  # (B, T, N)
    ids, alphas = [], []
    for b, row in enumerate(tokens.tolist()):
        length = row.index(eos) if eos in row else len(row)
        ids.append(row[:length])
        alphas.append(stacked[b, :length] if stacked is not None else None)
    return ids, alphas


def _draw(
    logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator
) -> np.ndarray:
    """One word per row of logits (S, V), from softmax(logits / temperature), within the top k if
    given: the first word whose cumulative probability passes a uniform draw."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k, None]
        logits[logits < kth] = -np.inf
    cumulative = np.cumsum(_softmax(logits), axis=1)  # (S, V)
    drawn = rng.random(len(logits))[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative <= drawn).sum(axis=1), logits.shape[1] - 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def beam_search(
    runtime: Runtime,
    grid: np.ndarray,
    bos: int,
    eos: int,
    width: int = 3,
    max_len: int = MAX_LEN,
    banned: tuple[int, ...] = (),
) -> tuple[list[list[int]], list[np.ndarray | None]]:
    """Beam search of `width` for each image of grid (I, N, D), all beams in one batch of I*K.

    Scores are summed log-probabilities; a hypothesis that emits <eos> is set aside. Returns
    (ids, alphas) like `decode`: the best finished hypothesis per image (or the best unfinished
    one when none finished within max_len).
    """
    images = len(grid)
    state = runtime.start(grid, np.repeat(np.arange(images), width))
    # One live beam per image at first (the others at -inf), so that the first step does not
    # pick `width` copies of one word.
    scores = np.full((images, width), -np.inf)
    scores[:, 0] = 0.0
    never = np.array(sorted({*banned, bos}), dtype=np.intp)
    words = np.full(images * width, bos, dtype=np.intp)
    history = np.zeros((images * width, 0), dtype=np.intp)  # (I*K, t)
    maps = None  # (I*K, t, N)
    best: list[tuple[float, list[int], np.ndarray | None]] = [(-np.inf, [], None)] * images
    for _ in range(max_len):
        logits, alpha = runtime.step(words, state)
        logits[:, never] = -np.inf
        total = (scores.reshape(-1, 1) + _log_softmax(logits)).reshape(images, -1)  # (I, K*V)
        top = np.argsort(-total, axis=1, kind="stable")[:, :width]  # (I, K), ties: first
        scores = np.take_along_axis(total, top, axis=1)
        vocab = logits.shape[1]
        parent = (top // vocab + np.arange(images)[:, None] * width).reshape(-1)
        words = (top % vocab).reshape(-1)
        history = np.concatenate([history[parent], words[:, None]], axis=1)
        if alpha is not None:
            step_maps = alpha[parent, None]
            maps = step_maps if maps is None else np.concatenate([maps[parent], step_maps], 1)
        state = runtime.select(state, parent)
        ended = (words == eos).reshape(images, width)
        for i, k in zip(*np.nonzero(ended)):
            if scores[i, k] > best[i][0]:
                row = i * width + k
                found = maps[row, :-1] if maps is not None else None
                best[i] = (float(scores[i, k]), history[row, :-1].tolist(), found)
        scores[ended] = -np.inf
        # An image is done when its best finished score beats every live beam (scores only fall).
        if all(best[i][0] >= scores[i].max() for i in range(images)):
            break
    ids, alphas = [], []
    for i in range(images):
        if best[i][0] == -np.inf:  # nothing finished: the best live beam
            row = i * width + int(scores[i].argmax())
            best[i] = (0.0, history[row].tolist(), maps[row] if maps is not None else None)
        ids.append(best[i][1])
        alphas.append(best[i][2])
    return ids, alphas
