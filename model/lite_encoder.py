"""The encoder's CNN through LiteRT (TensorFlow Lite's runtime) and its XNNPACK kernels: the CPU
serving path's encoder where the `ai-edge-litert` wheel installs (Linux on x86_64 and ARM, macOS
on Apple silicon), ONNX Runtime's (model/onnx_encoder.py) elsewhere or with
CAPTION_ENCODER_RUNTIME=onnx.

Why a second runtime (issue 13): XNNPACK's convolutions on NHWC tensors ran the CNN faster than
ONNX Runtime's MLAS in its NCHWc layout, on the same weights, to float rounding. Measured on the
2-core AMD EPYC of this project, one 224 px image, paired medians of 40 rounds of 20 runs: with
AVX-512 1.11x as fast on two threads (3.24 against 3.66 ms), 1.05x on one; with the AVX-512
kernels hidden (bench/avx2_only.py, as on issue 13's AVX2-only VM) 1.17x and 1.08x. A whole lone
photo (encoding, both greedy captions, 5 samples; 60 rounds of 10): 1.03-1.04x with AVX-512,
1.07x without; 8 photos' encoding 0.99x and 1.06x.

The graph is written here, not converted: `build` walks the torch `Encoder`'s layers (their batch
norms already folded into the convolutions) and writes a TFLite flatbuffer with LiteRT's own
schema classes, so no TensorFlow and no converter. EfficientNet-Lite is TFLite's own model, so
its layers map one to one: each convolution with its fused ReLU6, the residual additions, and
TensorFlow's "same" padding, which the torch package imitates. The graph also turns the pixels
to NHWC and lays the taps onto the grid (averaged or repeated, then concatenated), which numpy
had taken 0.2 ms to do around it. `export` checks the graph against torch (the bundle's build,
model/bundle.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.onnx_encoder import TOLERANCE, OnnxEncoder, check_images, colour_fits_numpy
from model.preprocessing import LITE0_TAP_STRIDES, EncoderConfig

BANNER = b"Created TensorFlow Lite XNNPACK delegate"  # what LiteRT prints on its first interpreter
_making = threading.Lock()  # one interpreter made at a time: they share stderr's redirection


def available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteEncoder(OnnxEncoder):
    """OnnxEncoder's interface and threading (a batch's images side by side, a lone image's CNN
    on every core), its CNN run by LiteRT from the bundle's encoder.tflite."""

    def _session(self, threads: int) -> Any:
        return _Interpreters(self.path, threads)

    def runtime(self) -> str:
        from importlib import metadata

        return f"LiteRT {metadata.version('ai-edge-litert')} (XNNPACK)"


class _Interpreters:
    """pixels (B, 3, S, S) float32 -> the grid's CNN share (B, cells, channels) float32.

    An interpreter runs one call at a time, so each concurrent caller takes one of its own from
    an idle queue (made when none is idle): the encoder's worker threads and the lone image's
    caller. Each runs on `threads` threads and reads the flatbuffer from the same mapped file."""

    def __init__(self, path: Path, threads: int):
        self.path, self.threads = path, threads
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        first = self._interpreter()  # a broken file fails now
        self.input = first.get_input_details()[0]["index"]
        output = first.get_output_details()[0]
        self.output = output["index"]
        _, rows, cols, channels = output["shape"]
        self.shape = int(rows * cols), int(channels)
        self._idle.put(first)

    def _interpreter(self) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        with _making, _without_banner():
            interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            interpreter.allocate_tensors()
        return interpreter

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        try:
            interpreter = self._idle.get_nowait()
        except queue.Empty:
            interpreter = self._interpreter()
        try:
            out = np.empty((len(pixels), *self.shape), np.float32)
            for image, grid in zip(pixels, out):
                # The interpreter's own buffers, written and read in place: `tensor()` views,
                # none kept across `invoke`.
                interpreter.tensor(self.input)()[0] = image
                interpreter.invoke()
                grid[:] = interpreter.tensor(self.output)()[0].reshape(self.shape)
            return out
        finally:
            self._idle.put(interpreter)


@contextlib.contextmanager
def _without_banner() -> Iterator[None]:
    """LiteRT's C++ logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to
    the process's stderr when its first interpreter is made, outside Python's logging: a line
    that is not JSON in the bot's LOG_FORMAT=json output, and that nothing in its Python API turns
    off. So the stderr file descriptor goes to a file meanwhile, and whatever else was written
    there is written back. (Only the first interpreter of a process prints it; the few made
    later, at start-up or for a new concurrent caller, pass through the same filter.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = [line for line in caught.read().splitlines(True) if BANNER not in line]
            if rest:
                os.write(2, b"".join(rest))


# ----------------------------------------------------------------------------------------------
# Building the flatbuffer (torch): the serving bundle's builder calls `export` in its child.


class _Graph:
    """A TFLite subgraph being written: float32 tensors, their constant buffers, operators."""

    def __init__(self):
        from ai_edge_litert import schema_py_generated as schema

        self.s = schema
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.buffers = [schema.BufferT()]  # buffer 0: "no data" for every activation
        self.model.operatorCodes = []
        self.graph = schema.SubGraphT()
        self.graph.tensors, self.graph.operators = [], []
        self.codes: dict[int, int] = {}

    def tensor(self, shape, data: np.ndarray | None = None, name: str = "") -> int:
        """A float32 activation, or a constant: float32, or int32 (shapes, permutations)."""
        tensor = self.s.TensorT()
        integer = data is not None and data.dtype.kind in "iu"
        types = self.s.TensorType
        tensor.shape, tensor.name = list(shape), name
        tensor.type, tensor.buffer = (types.INT32 if integer else types.FLOAT32), 0
        if data is not None:
            buffer = self.s.BufferT()
            dtype = np.int32 if integer else np.float32
            buffer.data = np.ascontiguousarray(data, dtype).view(np.uint8).ravel()
            self.model.buffers.append(buffer)
            tensor.buffer = len(self.model.buffers) - 1
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def operator(self, code: int, inputs: list[int], output: int, options: Any) -> None:
        if code not in self.codes:
            entry = self.s.OperatorCodeT()
            entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 1
            self.model.operatorCodes.append(entry)
            self.codes[code] = len(self.model.operatorCodes) - 1
        op = self.s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = self.codes[code], inputs, [output]
        op.builtinOptionsType = getattr(self.s.BuiltinOptions, type(options).__name__[:-1])
        op.builtinOptions = options
        self.graph.operators.append(op)

    def conv(self, x: int, shape: tuple, conv, relu6: bool) -> tuple[int, tuple]:
        """A folded torch Conv2d (plain or depthwise) with TensorFlow's "same" padding."""
        s = self.s
        weight = conv.weight.detach().float().numpy()  # (O, I / groups, k, k)
        bias = conv.bias.detach().float().numpy()
        stride = conv.stride[0]
        batch, height, width, channels = shape
        depthwise = conv.groups == channels and conv.groups > 1
        if depthwise:  # TFLite's (1, k, k, C)
            options, code = s.DepthwiseConv2DOptionsT(), s.BuiltinOperator.DEPTHWISE_CONV_2D
            options.depthMultiplier = 1
            weight = weight.transpose(1, 2, 3, 0)
        else:  # TFLite's (O, k, k, I)
            options, code = s.Conv2DOptionsT(), s.BuiltinOperator.CONV_2D
            weight = weight.transpose(0, 2, 3, 1)
        options.padding, options.strideW, options.strideH = s.Padding.SAME, stride, stride
        options.dilationWFactor = options.dilationHFactor = 1
        activation = s.ActivationFunctionType
        options.fusedActivationFunction = activation.RELU6 if relu6 else activation.NONE
        out_shape = (batch, -(-height // stride), -(-width // stride), len(bias))
        y = self.tensor(out_shape)
        self.operator(
            code, [x, self.tensor(weight.shape, weight), self.tensor(bias.shape, bias)], y, options
        )
        return y, out_shape

    def add(self, a: int, b: int, shape: tuple) -> int:
        y = self.tensor(shape)
        self.operator(self.s.BuiltinOperator.ADD, [a, b], y, self.s.AddOptionsT())
        return y

    def average(self, x: int, shape: tuple, k: int) -> tuple[int, tuple]:
        """k x k average pooling, stride k: a tap finer than the grid onto its cells."""
        batch, height, width, channels = shape
        out_shape = (batch, height // k, width // k, channels)
        options = self.s.Pool2DOptionsT()
        options.padding, options.strideW, options.strideH = self.s.Padding.VALID, k, k
        options.filterWidth = options.filterHeight = k
        y = self.tensor(out_shape)
        self.operator(self.s.BuiltinOperator.AVERAGE_POOL_2D, [x], y, options)
        return y, out_shape

    def to_channels_last(self, x: int, shape: tuple) -> tuple[int, tuple]:
        """(B, C, H, W) -> (B, H, W, C): the model's input is the preprocessing's layout."""
        permutation = np.array([0, 2, 3, 1])
        out_shape = tuple(shape[i] for i in permutation)
        y = self.tensor(out_shape)
        self.operator(
            self.s.BuiltinOperator.TRANSPOSE,
            [x, self.tensor((4,), permutation)],
            y,
            self.s.TransposeOptionsT(),
        )
        return y, out_shape

    def repeated(self, x: int, shape: tuple, side: int) -> tuple[int, tuple]:
        """Each value over its k x k cells (nearest neighbour), as the torch Encoder's repeat."""
        out_shape = (shape[0], side, side, shape[3])
        y = self.tensor(out_shape)
        self.operator(
            self.s.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR,
            [x, self.tensor((2,), np.array([side, side]))],
            y,
            self.s.ResizeNearestNeighborOptionsT(),
        )
        return y, out_shape

    def concatenated(self, xs: list[int], shapes: list[tuple]) -> tuple[int, tuple]:
        """Along the channels."""
        out_shape = (*shapes[0][:3], sum(shape[3] for shape in shapes))
        options = self.s.ConcatenationOptionsT()
        options.axis = 3
        y = self.tensor(out_shape)
        self.operator(self.s.BuiltinOperator.CONCATENATION, xs, y, options)
        return y, out_shape

    def serialized(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        self.graph.inputs, self.graph.outputs = inputs, outputs
        self.model.subgraphs = [self.graph]
        self.model.description = "captionbot encoder (model/lite_encoder.py)"
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def supported(config: EncoderConfig) -> bool:
    """EfficientNet-Lite0 whose taps each cover a whole number of grid cells (or the reverse),
    with the colour statistics (if any) computed beside the graph."""
    if config.backbone != "efficientnet_lite0" or not colour_fits_numpy(config):
        return False
    rows, cols = config.grid
    sides = [math.ceil(config.image_size / stride) for stride in LITE0_TAP_STRIDES]  # tap maps
    return rows == cols and all(s % rows == 0 or rows % s == 0 for s in sides)


def build(encoder) -> bytes:
    """The flatbuffer of `encoder`'s CNN share (torch Encoder, EfficientNet-Lite0, `supported`):
    images (1, 3, S, S) -> grid (1, rows, cols, channels), each tap averaged or repeated onto
    the grid's cells."""
    from model.encoder import LITE0_TAPS  # torch: the bundle's builder has it

    net, side = encoder.network, encoder.grid[0]
    graph = _Graph()
    size = encoder.config.image_size
    shape: tuple = (1, 3, size, size)
    x = images = graph.tensor(shape, name="images")
    x, shape = graph.to_channels_last(x, shape)
    x, shape = graph.conv(x, shape, net._conv_stem, relu6=True)
    taps, tap_shapes = [], []
    for index, block in enumerate(net._blocks[: max(LITE0_TAPS) + 1]):
        before, before_shape = x, shape
        if block._block_args.expand_ratio != 1:
            x, shape = graph.conv(x, shape, block._expand_conv, relu6=True)
        x, shape = graph.conv(x, shape, block._depthwise_conv, relu6=True)
        x, shape = graph.conv(x, shape, block._project_conv, relu6=False)
        if shape == before_shape and block.id_skip:  # stride 1, as many channels in as out
            x = graph.add(x, before, shape)
        if index in LITE0_TAPS:
            tap, tap_shape = x, shape
            if shape[1] > side:
                tap, tap_shape = graph.average(x, shape, shape[1] // side)
            elif shape[1] < side:
                tap, tap_shape = graph.repeated(x, shape, side)
            taps.append(tap)
            tap_shapes.append(tap_shape)
    grid, _ = graph.concatenated(taps, tap_shapes)
    return graph.serialized([images], [grid])


def export(encoder, out: Path) -> dict | None:
    """Write `encoder`'s graph to `out` and check it against torch on noise and rendered scenes
    (the grid's CNN share, raising beyond onnx_encoder.TOLERANCE); None where LiteRT or the
    encoder's config is not supported."""
    import torch

    if not available() or not supported(encoder.config):
        return None
    out.write_bytes(build(encoder))
    images = check_images(encoder.config)
    with torch.inference_mode():
        expected = encoder.cnn_features(torch.from_numpy(images)).numpy()
    got = _Interpreters(out, 1)(images)
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise RuntimeError(f"the LiteRT graph differs from torch by {difference:.2e}")
    return {"largest_difference": difference, "bytes": out.stat().st_size}
