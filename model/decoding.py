"""Decoding without torch: both decoders' steps (numpy, and ONNX Runtime for the products), and
greedy decoding, sampling and beam search written once over them.

A decoder's decoding tables (`Tables`: its DecoderConfig as a dict and plain float32 arrays) are
exported from the trained torch module by model/decoders.py's `decoder_tables` and can be saved
to and loaded from an .npz file, so a serving process decodes without importing torch (506 MB of
RSS on its own). Every runtime has the same incremental interface,

    state = runtime.start(grid, rows)            # grid (I, N, D) float32 or float16, rows (B,)
    logits, alpha = runtime.step(words, state)   # words (B,) -> logits (B, V), alpha (B, N) | None
    state = runtime.select(state, index)         # keep, repeat or reorder rows

`step` updates `state` in place. The tables regroup every projection by what it reads (the
previous word: a table row; the previous state h; the attended context), so that a step is one
row lookup, the attention and two matrix products (model/decoders.py describes the folding). The
results equal the teacher-forced torch pass to float rounding (tests/test_decoders.py).

Speed (issue 13). Every product with a weight matrix runs in ONNX Runtime's MLAS (a one-node
MatMul model per weight matrix, its constant right-hand side packed once) where onnxruntime is
importable, and the attention of a step, the LSTM cell and `decode`'s choice of words and rows
between steps run as numba kernels (model/decoding_kernels.py) where they compile; else numpy,
which the tests hold them to. The baseline's greedy decoding is one ONNX Runtime graph that loops
over its steps (`BaselineRuntime.greedy`, tested to write what `decode` writes): it holds no GIL,
so a lone photo's baseline caption runs beside the attention decoder's captions.
Measured on the 2-core AMD EPYC (AVX-512) of issue 13, one thread, (B, 384) @ (384, 1706): MLAS
33 / 39 / 60 us at B = 1 / 6 / 8; numpy's OpenBLAS 32 / 168 / 141 us (its small-M kernels are
slow, B = 6 slower than B = 8, and its threads stalled for ms on busy cores), torch's MKL 32 /
146 / 156 us. `decode` also runs one row per distinct caption so far: the samples of one image
share the first step and often their first words, and finished captions drop out. Serving runs
the attention decoder's product of h in int8 (`Product`, `runtime(..., int8=True)`): from 6 rows
on a product is bound by arithmetic, and in int8 it ran 1.6-2.6 times as fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

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
# ONNX Runtime graphs, built with the onnx package's helpers (imported on first use)


def _node(op: str, inputs: list[str], output: str, **attributes: int | list[int]):
    """A NodeProto with one output; attributes are ints or lists of ints."""
    from onnx import helper

    return helper.make_node(op, inputs, [output], **attributes)  # type: ignore[arg-type]


def _model(
    nodes: list, constants: Arrays, inputs: dict, outputs: dict, half: tuple[str, ...] = ()
) -> bytes:
    """A serialized ModelProto (IR 8, opset 13). inputs, outputs: float32 tensors' names -> ranks
    (every dimension symbolic), float16 for the inputs named in `half`; constants: int64, int8 or
    uint8 arrays, or float32 ones."""
    from onnx import TensorProto, helper, numpy_helper

    def value(name: str, rank: int):
        kind = TensorProto.FLOAT16 if name in half else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, kind, [f"{name}_{d}" for d in range(rank)])

    def tensor(name: str, array: np.ndarray):
        kind = array.dtype if array.dtype in (np.int64, np.int8, np.uint8) else np.float32
        return numpy_helper.from_array(np.ascontiguousarray(array, kind), name)

    graph = helper.make_graph(
        nodes,
        "decoding",
        [value(name, rank) for name, rank in inputs.items()],
        [value(name, rank) for name, rank in outputs.items()],
        [tensor(name, array) for name, array in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


class _Graph:
    """A graph of one input x, float32 or float16 (cast inside the graph: numpy took 113 us to
    cast a 196 x 488 grid, as long as the product that reads it), its nodes reading it as "x_";
    one ONNX Runtime session per input type, made on first use."""

    def __init__(self, nodes: list, constants: Arrays, rank: int, outputs: dict):
        self.nodes, self.constants, self.rank, self.outputs = nodes, constants, rank, outputs
        self.sessions: dict = {}

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        half = x.dtype == np.float16
        session = self.sessions.get(half) or self._start(half)
        return session.run(None, {"x": np.ascontiguousarray(x, np.float16 if half else np.float32)})

    def _start(self, half: bool):
        cast = _node("Cast", ["x"], "x_", to=1) if half else _node("Identity", ["x"], "x_")
        model = _model(
            [cast, *self.nodes], self.constants, {"x": self.rank}, self.outputs, ("x",) * half
        )
        self.sessions[half] = session = _session(model)
        return session


class Product:
    """x (..., K) -> x @ w (..., O) for one weight matrix w (K, O), x float32 or float16: by MLAS
    where onnxruntime is importable and `mlas`, else numpy.

    With `int8`, in integers: w rounded per output column to -127..127 (its scale max|w| / 127),
    each row of x by its own scale to -63..63 (max|x_row| / 63; held as uint8 1..127 around the
    zero point 64, the form MLAS's integer kernels take), their product exact in int32 and scaled
    back. A row's result thus depends on that row alone (in float32 the kernels change with the
    batch's size), and the numpy fallback gives the same integers, on every x86 CPU.

    x has 7 bits because MLAS's kernels for CPUs without VNNI (AVX2, AVX-512 before Cascade
    Lake) add each two neighbouring products in 16 bits, saturating (vpmaddubsw): 127 * 127 * 2 =
    32,258 fits, where x as uint8 1..255 did not. With those kernels emulated in numpy
    (tests/test_decoders.py), 48 of 300 held-out scenes' greedy captions by the bundled attention
    decoder changed with an 8-bit x (exact match 0.973 -> 0.967, relation accuracy 0.957 ->
    0.938), none with a 7-bit one. x rather than w: the products' RMS error against float32
    0.0037 against 0.0056 with a 7-bit w (8 bits each: 0.0030; the outputs' RMS 1.04).

    Measured on the AMD EPYC (AVX-512 VNNI), one thread, (B, 384) @ (384, 1706): 36 / 58 / 82 /
    165 us at B = 1 / 6 / 12 / 32, against 43 / 90 / 169 / 432 us in float32 (a product of 6 rows
    or more is bound by arithmetic there, not by reading w)."""

    X_STEPS, X_ZERO = 63, 64  # x's integer range -63..63, and its uint8 zero point

    def __init__(self, w: np.ndarray, mlas: bool = True, int8: bool = False):
        self.w = np.ascontiguousarray(w, dtype=np.float32)
        self.int8 = int8
        if int8:
            self.w_scale = _scale(self.w, axis=0, steps=127)  # (O,)
            self.w_int8 = np.round(self.w / self.w_scale).astype(np.int8)
            nodes, constants = self._int8_graph()
        else:
            nodes, constants = [_node("MatMul", ["x_", "w"], "y")], {"w": self.w}
        self._graph = _Graph(nodes, constants, 2, {"y": 2}) if _mlas(mlas) else None

    def _int8_graph(self) -> tuple[list, Arrays]:
        nodes = [
            _node("Abs", ["x_"], "magnitude"),
            _node("ReduceMax", ["magnitude"], "largest", axes=[1], keepdims=1),  # (B, 1)
            _node("Max", ["largest", "tiny"], "nonzero"),
            _node("Div", ["nonzero", "steps"], "row_scale"),  # max|x_row| / 63
            _node("Div", ["x_", "row_scale"], "scaled"),
            _node("Round", ["scaled"], "rounded"),  # -63..63, half to even as numpy
            _node("Add", ["rounded", "offset"], "shifted"),
            _node("Cast", ["shifted"], "x_int8", to=2),  # uint8 around the zero point 64
            _node("MatMulInteger", ["x_int8", "w_int8", "zero_point"], "y_int"),  # (B, O) int32
            _node("Cast", ["y_int"], "y_float", to=1),
            _node("Mul", ["row_scale", "w_scale"], "scales"),
            _node("Mul", ["y_float", "scales"], "y"),
        ]
        constants = {
            "w_int8": self.w_int8,
            "w_scale": self.w_scale,
            "tiny": np.array(_TINY, np.float32),
            "steps": np.array(self.X_STEPS, np.float32),
            "offset": np.array(self.X_ZERO, np.float32),
            "zero_point": np.array(self.X_ZERO, np.uint8),
        }
        return nodes, constants

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._graph is None:
            return self._numpy(x)
        return self._graph(x.reshape(-1, x.shape[-1]))[0].reshape(*x.shape[:-1], -1)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32, copy=False)
        if not self.int8:
            return x @ self.w
        rounded, row_scale = self.rounded_rows(x)
        exact = rounded.astype(np.float64) @ self.w_int8.astype(np.float64)  # integers, exactly
        return exact.astype(np.float32) * (row_scale * self.w_scale)

    def rounded_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (..., K) in int8's form: its rows rounded to -X_STEPS..X_STEPS (float32) and each
        row's scale (..., 1)."""
        x = x.astype(np.float32, copy=False)
        row_scale = _scale(x, axis=-1, steps=self.X_STEPS)[..., None]
        return np.round(x / row_scale), row_scale


_TINY = 1e-30  # the least scale, for an all-zero row or column


def _scale(x: np.ndarray, axis: int, steps: int) -> np.ndarray:
    """max|x| / steps along `axis` (float32): the integer step for those values."""
    largest = np.abs(x).max(axis=axis)
    return np.maximum(largest, np.float32(_TINY)) / np.float32(steps)


def _mlas(wanted: bool) -> bool:
    return wanted and _onnxruntime() is not None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _session(model: bytes):
    """An ONNX Runtime session of `model` on one thread; None where onnxruntime is missing."""
    ort = _onnxruntime()
    if ort is None:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a product this small splits poorly; callers run in parallel
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


# Vectorised reductions need their sums reordered; no flag that assumes finite numbers
_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}


@lru_cache(maxsize=1)
def compiled_kernels() -> SimpleNamespace | None:
    """model/decoding_kernels.py's kernels compiled by numba (model/compiled.py), or None: numpy
    does their work."""
    try:
        from model import decoding_kernels as k
    except ImportError:  # no numba
        return None
    from model.compiled import compile_kernels

    kernels = {"attend": k.attend, "lstm": k.lstm, "next_words": k.next_words}
    kernels.update(distinct=k.distinct, query_and_gate=k.query_and_gate)
    return compile_kernels("decoding", kernels, _warm_up, fastmath=_FASTMATH)


def _warm_up(kernels: SimpleNamespace) -> None:
    """Compile (or load) the kernels for the argument types of real calls, on tiny arrays."""
    one, ids = np.ones, np.zeros(2, np.int64)
    kernels.attend(
        *(one((1, 4), np.float32), one((1, 1, 2, 2), np.float32), np.zeros(1, np.int64)),
        *(one((1, 4, 2), np.float32), one((1, 2), np.float32), one((1, 4, 3), np.float32)),
        *(one(1, np.float32), one((1, 2, 3, 3), np.float32), one((1, 2), np.float32)),
        one(2, np.float32),
    )
    floats = (one((1, 4), np.float32), one((1, 5), np.float32), one((1, 1), np.float32))
    kernels.lstm(one((2, 4), np.float32), ids[:1], *floats)
    kernels.query_and_gate(one((2, 7), np.float32), ids[:1], one((1, 7), np.float32), 0.5, 4, 2)
    sampling, finished = np.array([True, False]), np.zeros(2, bool)
    kernels.next_words(one((1, 3), np.float32), ids, ids[:1], sampling, one(1), finished, 1.0, 2, 0)
    kernels.distinct(ids, ids, finished)


# ----------------------------------------------------------------------------------------------
# The two decoders' steps


def _lstm(
    table: np.ndarray,
    words: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    c: np.ndarray,
    kernels: SimpleNamespace | None,
) -> tuple[np.ndarray, np.ndarray]:
    """An LSTM cell's update from its gate pre-activations table[words] + first + second (the first
    4H columns of each: (B, 4H), laid out i, f, o, g with the i, f, o quarters halved by the
    tables: sigmoid(x) = (1 + tanh(x / 2)) / 2, so one tanh serves all four gates). By the compiled
    kernel where given (model/decoding_kernels.py), else numpy."""
    four_h = 4 * c.shape[1]
    if kernels is None:
        return _lstm_numpy(table[words, :four_h] + first[:, :four_h] + second[:, :four_h], c)
    return kernels.lstm(_floats(table), _ids(words), _floats(first), _floats(second), _floats(c))


def _floats(x: np.ndarray) -> np.ndarray:
    """x as the compiled kernels take it: float32, C order (one signature, compiled once)."""
    return np.ascontiguousarray(x, np.float32)


def _ids(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.int64)


def _lstm_numpy(gates: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_lstm in numpy. Overwrites `gates`."""
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

    def __init__(self, tables: Tables, compiled: bool = True):
        self.config, a = tables.config, tables.arrays
        self.a = a
        self.hidden = self.config["hidden_dim"]
        self.from_h = Product(a["from_h"], compiled)  # h (B, H) -> (B, 4H + V): gates | logits
        self.kernels = compiled_kernels() if compiled else None  # numba's, or None: numpy
        # greedy's loop graphs, by (bos, eos, max_len, never); None without onnxruntime
        self._loops: dict | None = {} if _mlas(compiled) else None
        # The image's share as one graph: 166 us per image, 238 us a product at a time, 390 us
        # in numpy (whose multithreaded OpenBLAS also took 22 ms on 2 busy cores)
        self._image = (
            _Graph(*self._image_graph(a), 3, {"gates": 2, "hc": 2}) if _mlas(compiled) else None
        )

    @staticmethod
    def _image_graph(a: Arrays) -> tuple[list, Arrays]:
        def layer(x: str, w: str, b: str, out: str) -> list:  # out = tanh(x @ w + b)
            return [
                _node("MatMul", [x, w], f"{out}_product"),
                _node("Add", [f"{out}_product", b], f"{out}_sum"),
                _node("Tanh", [f"{out}_sum"], out),
            ]

        nodes = [
            _node("MatMul", ["pool", "x_"], "pooled"),  # (L*L, N) @ (I, N, D) -> (I, L*L, D)
            *layer("pooled", "reduce1_w", "reduce1_b", "reduced1"),  # (I, L*L, R)
            *layer("reduced1", "reduce2_w", "reduce2_b", "reduced2"),  # (I, L*L, layout_dim)
            _node("Reshape", ["reduced2", "flat"], "layout"),  # (I, L*L*layout_dim)
            *layer("layout", "image_w", "image_b", "v"),  # (I, H)
            *layer("v", "init_w", "init_b", "hc"),  # (I, 2H): h | c
            _node("MatMul", ["v", "image_gates"], "gates"),  # (I, 4H)
        ]
        names = ("pool", "reduce1_w", "reduce1_b", "reduce2_w", "reduce2_b", "image_w", "image_b")
        constants = {name: a[name] for name in (*names, "init_w", "init_b", "image_gates")}
        return nodes, {**constants, "flat": np.array([0, -1], np.int64)}

    def _image_numpy(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = self.a
        pooled = np.matmul(a["pool"], grid.astype(np.float32))  # (I, L*L, D)
        cells = np.tanh(pooled @ a["reduce1_w"] + a["reduce1_b"])  # (I, L*L, R)
        cells = np.tanh(cells @ a["reduce2_w"] + a["reduce2_b"])  # (I, L*L, layout_dim)
        v = np.tanh(cells.reshape(len(grid), -1) @ a["image_w"] + a["image_b"])  # (I, H)
        return v @ a["image_gates"], np.tanh(v @ a["init_w"] + a["init_b"])

    def start(self, grid: np.ndarray, rows: np.ndarray | None = None) -> State:
        """grid (I, N, D) -> state for rows (B,) of images (default: one row per image)."""
        image = self._image(grid) if self._image is not None else self._image_numpy(grid)
        gates, hc = image  # (I, 4H), (I, 2H)
        if rows is not None:
            gates, hc = gates[rows], hc[rows]
        return {
            "image_gates": gates,  # (B, 4H): the image's share of the gates
            "c": np.ascontiguousarray(hc[:, self.hidden :]),  # (B, H)
            "from_h": self.from_h(hc[:, : self.hidden]),  # (B, 4H + V)
        }

    def step(self, words: np.ndarray, state: State) -> tuple[np.ndarray, None]:
        four_h = 4 * self.hidden
        from_h = state["from_h"]
        table, image = self.a["word_gates"], state["image_gates"]
        h, state["c"] = _lstm(table, words, image, from_h, state["c"], self.kernels)
        state["from_h"] = from_h = self.from_h(h)
        return from_h[:, four_h:] + self.a["fc_b"], None  # (B, V)

    def select(self, state: State, index: np.ndarray) -> State:
        return {name: state[name][index] for name in self.per_row}

    def greedy(
        self, grid: np.ndarray, bos: int, eos: int, max_len: int, banned: tuple[int, ...]
    ) -> np.ndarray | None:
        """Greedy captions as `decode` writes them, (B, T) token ids, from one ONNX Runtime
        graph that loops over the steps (`_greedy_loop`); None without onnxruntime.

        The loop holds no GIL while it runs, so a lone photo's baseline caption, written beside
        the attention decoder's captions, no longer waits for that decoder's numpy or holds it
        up: the lone photo's captions 4.8 against 5.5 ms (medians of 400 paired rounds), where the
        step-by-step caption beside them had gained nothing over writing it after them (5.5
        against 5.7 ms). Alone it is faster too (0.56 against 0.74 ms)."""
        if self._loops is None:
            return None
        never = tuple(sorted({*banned, bos}))
        key = (bos, eos, max_len, never)
        if key not in self._loops:
            self._loops[key] = _session(_greedy_loop(self.a, self.hidden, eos, never, max_len))
        loop = self._loops[key]
        state, count = self.start(grid), len(grid)
        (words,) = loop.run(
            None,
            {
                "image_gates": state["image_gates"],
                "c0": state["c"],
                "from_h0": np.ascontiguousarray(state["from_h"][:, : 4 * self.hidden]),
                "word0": np.full(count, bos, np.int64),
                "finished0": np.zeros(count, bool),
            },
        )
        return words.T  # (B, T)


def _greedy_loop(a: Arrays, hidden: int, eos: int, never: tuple[int, ...], max_len: int) -> bytes:
    """The baseline's greedy decoding as an ONNX Loop: a step as BaselineRuntime.step does it
    (`_lstm`'s one tanh for all gates), the banned words' logits -inf, argmax (the first of
    equal maxima, as numpy's), <eos> once finished, until every caption has ended or max_len.
    The weights are the loop body's own constants: read from the outer graph, ONNX Runtime did
    not prepack them (the attention decoder's context product 90 against 60 us a step)."""
    from onnx import TensorProto, helper, numpy_helper

    H, four_h, vocab = hidden, 4 * hidden, len(a["fc_b"])
    fc_b = a["fc_b"].astype(np.float32)
    fc_b[list(never)] = -np.inf
    ends = {"h1": H, "h2": 2 * H, "h3": 3 * H, "h4": four_h, "all": four_h + vocab}
    constants = {
        "word_gates": a["word_gates"],
        "w": a["from_h"],
        "fc_b": fc_b,
        "eos": np.array(eos, np.int64),
        "half": np.array(0.5, np.float32),
        "zero": np.array([0], np.int64),
        "axis1": np.array([1], np.int64),
        **{name: np.array([end], np.int64) for name, end in ends.items()},
    }

    def cut(x: str, start: str, end: str, out: str):  # x[:, start:end]
        return _node("Slice", [x, start, end, "axis1"], out)

    body_nodes = [
        _node("Gather", ["word_gates", "word"], "word_share", axis=0),  # (B, 4H)
        _node("Add", ["word_share", "image_gates"], "outside"),
        _node("Add", ["outside", "from_h"], "gates"),
        _node("Tanh", ["gates"], "t"),  # (B, 4H): i, f, o halved, then g
        cut("t", "zero", "h3", "t_ifo"),
        _node("Mul", ["t_ifo", "half"], "t_half"),
        _node("Add", ["t_half", "half"], "s"),  # sigmoids of i, f, o
        cut("s", "zero", "h1", "i"),
        cut("s", "h1", "h2", "f"),
        cut("s", "h2", "h3", "o"),
        cut("t", "h3", "h4", "g"),
        _node("Mul", ["f", "c"], "kept"),
        _node("Mul", ["i", "g"], "written"),
        _node("Add", ["kept", "written"], "c_next"),  # (B, H)
        _node("Tanh", ["c_next"], "c_tanh"),
        _node("Mul", ["o", "c_tanh"], "h"),  # (B, H)
        _node("MatMul", ["h", "w"], "product"),  # (B, 4H + V)
        cut("product", "zero", "h4", "from_h_next"),
        cut("product", "h4", "all", "product_v"),
        _node("Add", ["product_v", "fc_b"], "logits"),  # (B, V), banned words -inf
        _node("ArgMax", ["logits"], "best", axis=1, keepdims=0),
        _node("Where", ["finished", "eos", "best"], "word_next"),
        _node("Identity", ["word_next"], "written_word"),
        _node("Equal", ["word_next", "eos"], "ended"),
        _node("Or", ["finished", "ended"], "finished_next"),
        _node("Cast", ["finished_next"], "finished_int", to=TensorProto.INT32),
        _node("ReduceMin", ["finished_int"], "all_ended", keepdims=0),
        _node("Cast", ["all_ended"], "all_ended_bool", to=TensorProto.BOOL),
        _node("Not", ["all_ended_bool"], "go_on"),
    ]

    def value(name: str, kind: int, shape):
        return helper.make_tensor_value_info(name, kind, shape)

    f32, i64, boolean = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
    carried = [
        ("word", i64, ["B"]),
        ("c", f32, ["B", H]),
        ("from_h", f32, ["B", four_h]),
        ("finished", boolean, ["B"]),
    ]
    body = helper.make_graph(
        body_nodes,
        "step",
        [value("step", i64, []), value("go", boolean, None)]
        + [value(name, kind, shape) for name, kind, shape in carried],
        [value("go_on", boolean, None)]
        + [value(f"{name}_next", kind, shape) for name, kind, shape in carried]
        + [value("written_word", i64, ["B"])],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in constants.items()],
    )
    start = ["word0", "c0", "from_h0", "finished0"]
    loop = helper.make_node(
        "Loop",
        ["max_len", "go0", *start],
        ["word_last", "c_last", "from_h_last", "finished_last", "words"],
        body=body,
    )
    graph = helper.make_graph(
        [loop],
        "greedy",
        [value("image_gates", f32, ["B", four_h])]
        + [value(name, kind, shape) for name, (_, kind, shape) in zip(start, carried)],
        [value("words", i64, ["T", "B"])],
        [
            numpy_helper.from_array(np.array(max_len, np.int64), "max_len"),
            numpy_helper.from_array(np.array(True), "go0"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


class Attend:
    """The attention of one step and its gated context, for every row:

        alpha (B, N), covered (B, F, S, S), image (B,), keys (I, N, A), query (B, A),
        cells (I, N, C), beta (B,)  ->  alpha (B, N), covered (B, F, S, S), context (B, C)

    alpha is the last map, covered the location filters' response to the sum of past maps (the
    convolution is linear, so only the last map is convolved and the sum's response is kept);
    row b reads image image[b]'s keys and cells, kept once per image. Compiled by numba
    (model/decoding_kernels.py: all rows in one call, measured there against the ONNX Runtime
    graph it replaced) where it compiles, else numpy, a run of rows of one image at a time. The
    product that reads the context is AttentionRuntime's, once for the rows of every image."""

    def __init__(self, a: Arrays, side: int, compiled: bool = True):
        conv = np.ascontiguousarray(a["location_conv"], np.float32)  # (F, 2, k, k): over the
        self.conv = conv  # last map, over the sum of past maps
        self.filters, self.kernel, self.side = conv.shape[0], conv.shape[2], side
        flat = conv.reshape(self.filters, 2, -1)  # (F, 2, k*k)
        self.taps = np.ascontiguousarray(np.concatenate([flat[:, 0].T, flat[:, 1].T], 1))
        self.location = np.ascontiguousarray(a["location_w"], np.float32)  # (F, A)
        self.score = np.ascontiguousarray(a["score_w"], np.float32)  # (A,)
        self._kernels = compiled_kernels() if compiled else None

    def __call__(self, alpha, covered, image, keys, query, cells, beta):
        if self._kernels is None:
            return self._runs(alpha, covered, image, keys, query, cells, beta)
        return self._kernels.attend(
            *(_floats(alpha), _floats(covered), _ids(image), _floats(keys), _floats(query)),
            *(_floats(cells), _floats(beta), self.conv, self.location, self.score),
        )

    def _runs(self, alpha, covered, image, keys, query, cells, beta):
        """`_numpy` once per run of rows that read one image (decode and beam search keep rows
        in image order: one run per image), that image's keys and cells not copied."""
        bounds = [0, *(np.flatnonzero(np.diff(image)) + 1), len(image)]
        runs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # row slices are views: nothing copied
            one, rows = slice(image[lo], image[lo] + 1), slice(lo, hi)  # (1, ...): the image's
            runs.append(
                self._numpy(
                    alpha[rows], covered[rows], keys[one], query[rows], cells[one], beta[rows]
                )
            )
        return runs[0] if len(runs) == 1 else tuple(np.concatenate(part) for part in zip(*runs))

    def _numpy(self, alpha, covered, keys, query, cells, beta):
        """The rows of one image: keys (1, N, A), cells (1, N, C)."""
        batch, side, filters, pad = len(alpha), self.side, self.filters, self.kernel // 2
        padded = np.pad(alpha.reshape(batch, side, side), ((0, 0), (pad, pad), (pad, pad)))
        taps = sliding_window_view(padded, (self.kernel, self.kernel), axis=(1, 2))
        response = taps.reshape(batch * side * side, -1) @ self.taps  # (B*N, 2F)
        response = response.reshape(batch, side * side, 2 * filters).transpose(0, 2, 1)
        covered = covered + response[:, filters:].reshape(covered.shape)  # (B, F, S, S)
        where = response[:, :filters] + covered.reshape(batch, filters, -1)  # (B, F, N)
        energy = where.transpose(0, 2, 1) @ self.location + keys + query[:, None, :]
        alpha = _softmax(np.tanh(energy) @ self.score)  # (B, N); the score's bias cancels
        context = np.matmul(alpha[:, None, :], cells)[:, 0] * beta[:, None]  # (B, C)
        return alpha, covered, context


class AttentionRuntime:
    """ShowAttendTellDecoder's steps: location-aware additive attention, gated context.

    The cells and keys are kept once per image, never per row: each row has its image's index,
    and a step attends each run of rows that read one image with that image's cells and keys.
    (Copying them to every row, as `select` once did, moved 400 KB a row: 19 MB a step for
    8 photos with their samples, a fifth of the bot's decoding time.)"""

    per_row = ("c", "from_h", "alpha", "covered", "image")

    def __init__(
        self,
        tables: Tables,
        compiled: bool = True,
        int8: bool = False,
        repeated: tuple[int, int, int] | None = None,
    ):
        self.config, a = tables.config, tables.arrays
        self.a = a
        self.hidden, self.attention = self.config["hidden_dim"], self.config["attention_dim"]
        self.side = int(round(self.config["num_cells"] ** 0.5))
        # h (B, H) -> (B, 4H + A + 1 + V): gates | query | gate | logits; in int8 if asked
        # (`Product`). The context's product stays float32: in int8 too, the bundled weights'
        # relation accuracy at 224 px fell from 0.952 to 0.944 (h alone: every score within 0.1).
        self.from_h = Product(a["from_h"], compiled, int8)
        self.attend = Attend(a, self.side, compiled)
        self.context = Product(a["context"], compiled)  # gated context (B, C) -> (B, 4H + V)
        self.kernels = compiled_kernels() if compiled else None  # numba's, or None: numpy
        # What each image gives every row that reads it, as one graph: 1.33 against 1.47 ms per
        # image a product at a time with numpy between them (10.9 against 13.5 ms for 8 images)
        self._images = (
            _Graph(*self._images_graph(repeated), 3, self._IMAGES) if _mlas(compiled) else None
        )

    _IMAGES = {"cells": 3, "keys": 3, "hc": 2}  # the image graph's outputs and their ranks

    def _images_graph(self, repeated: tuple[int, int, int] | None) -> tuple[list, Arrays]:
        """The image graph's nodes and constants. `repeated` (first, end, k): the grid's columns
        first..end-1 repeat over k x k blocks of cells (EncoderConfig.repeated_columns), so the
        cells' product reads them at one cell per block and repeats its result (`_cells_product`).
        """
        names = ("cells_b", "position", "keys_w", "keys_b", "init_w", "init_b")
        constants = {name: self.a[name] for name in names}
        cells = self.side**2
        constants["average"] = np.full((1, cells), 1 / cells, np.float32)
        constants["flat"] = np.array([0, -1], np.int64)
        if repeated is None:
            # (I, N, D) -> (I, N, C)
            product = [_node("MatMul", ["x_", "cells_w"], "cells_product")]
            constants["cells_w"] = self.a["cells_w"]
        else:
            product, more = self._cells_product(*repeated)
            constants.update(more)
        return [*product, *self._after_product()], constants

    def _cells_product(self, first: int, end: int, k: int) -> tuple[list, Arrays]:
        """grid (I, N, D) @ cells_w (D, C) with the repeated columns read once per k x k block:
        at 14x14 cells the block-6 tap's 320 of 488 columns at 49 cells instead of 196, the image
        graph 0.71-0.87 against 0.99-1.12 ms per image (one thread, 200-300 interleaved runs;
        8 images 5.6-6.0 against 7.9-8.3 ms), its outputs within 1.4e-5 of the whole product's
        (float32 rounding; the model card's scores unchanged)."""
        side, w = self.side, self.a["cells_w"]
        line = np.arange(side)  # a row's (or column's) cells
        block_cells = (line[::k, None] * side + line[None, ::k]).ravel()  # each block's first
        cell_block = (line[:, None] // k * (side // k) + line[None, :] // k).ravel()  # (N,)
        nodes = [
            _node("Gather", ["x_", "block_cells"], "block_grid", axis=1),  # (I, N / k^2, D)
            _node("Slice", ["block_grid", "first", "end", "features"], "block_x"),
            _node("MatMul", ["block_x", "repeated_w"], "block_product"),  # (I, N / k^2, C)
            _node("Gather", ["block_product", "cell_block"], "repeated_product", axis=1),
            _node("Slice", ["x_", "zero", "first", "features"], "before"),  # (I, N, first)
            _node("Slice", ["x_", "end", "last", "features"], "after"),
            _node("Concat", ["before", "after"], "rest_x", axis=2),
            _node("MatMul", ["rest_x", "rest_w"], "rest_product"),  # (I, N, C)
            _node("Add", ["rest_product", "repeated_product"], "cells_product"),
        ]
        index = {"first": first, "end": end, "features": 2, "zero": 0, "last": len(w)}
        constants = {name: np.array([value], np.int64) for name, value in index.items()}
        return (
            nodes,
            {
                **constants,
                "block_cells": block_cells,  # (N / k^2,)
                "cell_block": cell_block,  # each cell's block
                "repeated_w": w[first:end],
                "rest_w": np.concatenate([w[:first], w[end:]]),
            },
        )

    @staticmethod
    def _after_product() -> list:
        return [
            _node("Add", ["cells_product", "cells_b"], "cells_sum"),
            _node("Relu", ["cells_sum"], "cells_relu"),
            _node("Add", ["cells_relu", "position"], "cells"),
            _node("MatMul", ["cells", "keys_w"], "keys_product"),  # (I, N, A)
            _node("Add", ["keys_product", "keys_b"], "keys"),
            # the mean cell as a product: ReduceMean over the cells took 55 us, this 7
            _node("MatMul", ["average", "cells"], "mean"),  # (1, N) @ (I, N, C) -> (I, 1, C)
            _node("MatMul", ["mean", "init_w"], "init_product"),
            _node("Add", ["init_product", "init_b"], "init_sum"),
            _node("Tanh", ["init_sum"], "hc_3"),
            _node("Reshape", ["hc_3", "flat"], "hc"),  # (I, 2H): h | c
        ]

    def _images_numpy(self, grid: np.ndarray) -> list[np.ndarray]:
        a = self.a
        cells = np.maximum(grid.astype(np.float32) @ a["cells_w"] + a["cells_b"], 0.0)
        cells += a["position"]  # (I, N, C)
        keys = cells @ a["keys_w"] + a["keys_b"]  # (I, N, A)
        return [cells, keys, np.tanh(cells.mean(axis=1) @ a["init_w"] + a["init_b"])]

    def start(self, grid: np.ndarray, rows: np.ndarray | None = None) -> State:
        """grid (I, N, D) -> state for rows (B,) of images (default: one row per image)."""
        hidden, images = self.hidden, len(grid)
        rows = np.arange(images) if rows is None else np.asarray(rows, dtype=np.intp)
        graph = self._images
        cells, keys, hc = graph(grid) if graph is not None else self._images_numpy(grid)
        hc = hc[rows]  # (B, 2H): h | c
        batch, filters = len(hc), self.attend.filters
        return {
            "cells": np.ascontiguousarray(cells),  # (I, N, C)
            "keys": np.ascontiguousarray(keys),  # (I, N, A)
            "image": rows,  # (B,): the image each row reads
            "c": np.ascontiguousarray(hc[:, hidden:]),  # (B, H)
            "from_h": self.from_h(hc[:, :hidden]),  # (B, 4H + A + 1 + V)
            "alpha": np.zeros((batch, self.side**2), np.float32),  # the last attention map
            "covered": np.zeros((batch, filters, self.side, self.side), np.float32),
        }

    def step(self, words: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray]:
        a, four_h, attention = self.a, 4 * self.hidden, self.attention
        table = a["word"]  # (V, 4H + A + V): each word's gates | query | logits
        from_h = state["from_h"]  # (B, 4H + A + 1 + V): gates | query | gate | logits
        query, beta = self._query_and_gate(words, from_h)  # (B, A), (B,)
        image, last, covered = state["image"], state["alpha"], state["covered"]
        alpha, state["covered"], context = self.attend(
            last, covered, image, state["keys"], query, state["cells"], beta
        )
        from_context = self.context(context)  # (B, 4H + V): gates | logits
        h, state["c"] = _lstm(table, words, from_h, from_context, state["c"], self.kernels)
        state["from_h"] = from_h = self.from_h(h)
        state["alpha"] = alpha
        logits = from_h[:, four_h + attention + 1 :] + from_context[:, four_h:]
        logits += table[words, four_h + attention :]
        return logits, alpha

    def _query_and_gate(self, words: np.ndarray, from_h: np.ndarray):
        """The step's query (B, A) and context gate (B,) from the last word and state."""
        a, start, end = self.a, 4 * self.hidden, 4 * self.hidden + self.attention
        if self.kernels is not None:
            gate_b = float(a["gate_b"][0])
            words, from_h = _ids(words), _floats(from_h)
            table = _floats(a["word"])
            return self.kernels.query_and_gate(table, words, from_h, gate_b, start, end - start)
        query = from_h[:, start:end] + a["word"][words, start:end]
        return query, 1.0 / (1.0 + np.exp(-(from_h[:, end] + a["gate_b"])))

    def select(self, state: State, index: np.ndarray) -> State:
        """Rows `index` of the state (the cells and keys are the images', shared)."""
        return {**state, **{name: state[name][index] for name in self.per_row}}


Runtime = BaselineRuntime | AttentionRuntime


def runtime(
    tables: Tables,
    compiled: bool = True,
    int8: bool = False,
    repeated: tuple[int, int, int] | None = None,
) -> Runtime:
    """The decoder's runtime. `int8`: the attention decoder's product of the state h in int8
    (`Product`), as the serving path runs it. The baseline stays float32: its products have one
    row per image, where int8 gains least, and in int8 (one scale per batch) its relation
    accuracy at 224 px fell 2.1 points. `repeated`: the grid's columns that repeat over blocks
    of cells (EncoderConfig.repeated_columns), which the attention decoder reads once a block."""
    kind = tables.config["kind"]
    if kind == "baseline":
        return BaselineRuntime(tables, compiled)
    if kind == "attention":
        return AttentionRuntime(tables, compiled, int8, repeated)
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

    grid (I, N, D) float32 or float16. rows: the image each caption reads, e.g. [0, 0, 0, 1, 1, 1]
    for three samples of two images; default one caption per image. greedy: True, False, or a
    bool per caption, so that greedy captions and samples decode together: the sampling rows draw
    from `rng` as they would alone (every step draws one number per sampling row, finished or
    not).

    Captions that so far read the same image and wrote the same words share one row of the
    runtime's batch, and finished captions have none: the runtime starts once per image, the
    first step runs once per image, and the samples of a confident decoder, which often begin
    alike, share their common beginning.
    """
    batch = len(rows) if rows is not None else len(grid)
    rows = rows if rows is not None else np.arange(batch)
    images, first, owner = np.unique(rows, return_index=True, return_inverse=True)
    state = runtime.start(grid, images)  # one runtime row per distinct caption so far
    sampling = ~np.broadcast_to(np.asarray(greedy, bool), (batch,))  # (B,)
    sampling_count = int(np.count_nonzero(sampling))  # S
    rng = rng if rng is not None else np.random.default_rng()
    choice = _Choice(
        np.array(sorted({*banned, bos}), dtype=np.intp), sampling, temperature, top_k or 0, eos
    )
    kernels = runtime.kernels
    step_words = np.full(len(images), bos, dtype=np.intp)  # (U,)
    finished = np.zeros(batch, dtype=bool)
    tokens, maps = [], []
    for _ in range(max_len):
        logits, alpha = runtime.step(step_words, state)  # (U, V), (U, N) | None
        draws = rng.random(sampling_count)  # one a sampling caption, finished or not
        words = _next_words(logits, owner, choice, draws, finished, kernels)  # (B,)
        vocab = logits.shape[1]
        tokens.append(words)
        maps.append(alpha[owner] if alpha is not None else None)
        ended = words == eos
        if (finished | ended).all():
            break
        if sampling_count or (ended & ~finished).any():  # else every row stays as it is
            count = len(first)
            owner, first, parent = _distinct(owner, words, finished | ended, vocab, kernels)
            if len(parent) != count or np.any(parent != np.arange(count)):
                state = runtime.select(state, parent)
        finished |= ended
        step_words = words[first]  # (U,)
    return _captions(np.stack(tokens, axis=1), maps, eos)


def greedy(
    runtime: Runtime,
    grid: np.ndarray,
    bos: int,
    eos: int,
    max_len: int = MAX_LEN,
    *,
    banned: tuple[int, ...] = (),
) -> tuple[list[list[int]], list[np.ndarray | None]]:
    """`decode`'s greedy captions, one per image; the baseline's from its one-graph loop
    (BaselineRuntime.greedy, tested equal to `decode`) where onnxruntime is importable."""
    loop = getattr(runtime, "greedy", None)
    tokens = loop(grid, bos, eos, max_len, banned) if loop is not None else None
    if tokens is None:
        return decode(runtime, grid, bos, eos, max_len, banned=banned)
    return _captions(tokens, [None], eos)


@dataclass(frozen=True)
class _Choice:
    """How `decode` chooses words: never (W,) words never written, sampling (B,) which captions
    sample (the others are greedy), temperature and top_k (0: all words) for those, <eos>."""

    never: np.ndarray
    sampling: np.ndarray
    temperature: float
    top_k: int
    eos: int


def _next_words(logits, owner, choice: _Choice, draws, finished, kernels) -> np.ndarray:
    """Each caption's next word (B,) from its runtime row's logits (U, V): the greedy ones' most
    likely (the first of equal maxima), the sampling ones' drawn by `_draw` from draws (S,), one
    uniform number a sampling caption in order; <eos> for finished captions. Compiled where
    `kernels` are given (model/decoding_kernels.py): 1-2 us a step against about 15 in numpy."""
    if kernels is not None:
        return kernels.next_words(
            *(_floats(logits), _ids(owner), _ids(choice.never), choice.sampling),
            *(draws, finished, float(choice.temperature), choice.top_k, choice.eos),
        )
    logits = logits[owner]  # (B, V)
    logits[:, choice.never] = -np.inf
    words = logits.argmax(axis=1)
    if len(draws):
        words[choice.sampling] = _draw(logits[choice.sampling], choice, draws)
    words[finished] = choice.eos
    return words


def _distinct(owner: np.ndarray, words: np.ndarray, finished: np.ndarray, vocab: int, kernels):
    """The runtime rows of the next step: one per distinct (row, word) among unfinished captions,
    in ascending order of (row, word). Returns each caption's new row (B,) (0 for finished ones),
    and per new row (U,) its first caption and its parent row. Compiled where `kernels` are
    given."""
    if kernels is not None:
        return kernels.distinct(_ids(owner), _ids(words), finished)
    live = np.flatnonzero(~finished)
    pairs, first, inverse = np.unique(
        owner[live] * vocab + words[live], return_index=True, return_inverse=True
    )
    owner = np.zeros_like(owner)
    owner[live] = inverse
    return owner, live[first], pairs // vocab


def _captions(tokens: np.ndarray, maps: list, eos: int):
    """tokens (B, T) -> ids up to <eos>, and each caption's (T, N) maps (or None)."""
    stacked = np.stack(maps, axis=1) if maps[0] is not None else None  # (B, T, N)
    ids, alphas = [], []
    for b, row in enumerate(tokens.tolist()):
        length = row.index(eos) if eos in row else len(row)
        ids.append(row[:length])
        alphas.append(stacked[b, :length] if stacked is not None else None)
    return ids, alphas


def _draw(logits: np.ndarray, choice: _Choice, draws: np.ndarray) -> np.ndarray:
    """One word per row of logits (S, V), from softmax(logits / temperature), within the top k if
    given: the first word whose cumulative probability passes its uniform draw (S,)."""
    logits = logits / max(choice.temperature, 1e-6)
    top_k = choice.top_k
    if 0 < top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k, None]
        logits[logits < kth] = -np.inf
    cumulative = np.cumsum(_softmax(logits), axis=1)  # (S, V)
    drawn = draws[:, None] * cumulative[:, -1:]
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
