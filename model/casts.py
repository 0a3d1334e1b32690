"""float32 <-> float16 for grids, by ONNX Runtime's Cast where onnxruntime is importable.

Every photo's grid is cast to float16 once encoded (`Encoded`: what the cache holds and the
decoders read) and back to float32 for the domain check. numpy converts half floats one number
at a time: a 196 x 488 grid took 235 us to float16, against 13 us by ONNX Runtime's vectorised
Cast (AMD EPYC, one thread); the domain check of 16 grids took 3.9 ms, 2.6 of them casting. Both
round to the nearest even, so the bits are the same (tests/test_casts.py).
"""

from __future__ import annotations

import functools

import numpy as np

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}  # TensorProto.FLOAT, FLOAT16


def to_half(x: np.ndarray) -> np.ndarray:
    return cast(x, np.float16)


def to_float(x: np.ndarray) -> np.ndarray:
    return cast(x, np.float32)


def cast(x: np.ndarray, dtype) -> np.ndarray:
    """x as `dtype` (float32 or float16); x itself if it already is."""
    x, dtype = np.asarray(x), np.dtype(dtype)
    if x.dtype == dtype:
        return x
    session = _session(x.dtype, dtype) if x.dtype in _ONNX_TYPES and x.ndim and x.size else None
    if session is None:
        return x.astype(dtype)
    return session.run(None, {"x": np.ascontiguousarray(x)})[0]


@functools.cache
def _session(source: np.dtype, target: np.dtype):
    """A one-node Cast graph on one thread (any shape), or None without onnxruntime."""
    try:
        import onnxruntime
        from onnx import helper
    except ImportError:
        return None
    types = _ONNX_TYPES[source], _ONNX_TYPES[target]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=types[1])],
        "cast",
        [helper.make_tensor_value_info("x", types[0], None)],
        [helper.make_tensor_value_info("y", types[1], None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
