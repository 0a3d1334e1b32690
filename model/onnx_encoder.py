"""The encoder through ONNX Runtime: the CPU serving path's encoder where LiteRT's wheel is missing
or CAPTION_ENCODER_RUNTIME=onnx (model/lite_encoder.py, slightly faster, has its threading from
here), 3-4x faster than torch's.

The encoder's CNN (EfficientNet-Lite0 up to block 6 and the grid taps: `Encoder.cnn_features`)
is exported with `torch.onnx.export(dynamo=True)` into the
serving bundle (model/bundle.py: built once per weights in a child process, checked against torch
there, cached). This module runs it: numpy in, numpy out, no torch — importing torch alone costs
about 500 MB of resident memory, which the bot should not pay. `export` (torch) is what the
bundle's builder calls. The colour statistics are computed beside the graph, in numpy
(model/preprocessing.py: 0.9 ms per image there, 1.7 ms inside the graph), where the grid's cells
tile the picture exactly; otherwise (Inception's 299 px in 8x8 cells) the graph holds them too.

    python -m model.onnx_encoder [--weights weights]  # build the serving bundle now (Docker, CI)

Measured and not adopted (AMD EPYC with AVX-512 VNNI, 2 cores shared, ORT 1.32, one image):
- int8 static quantization (onnxruntime.quantization, per-channel int8 weights, uint8
  activations, Conv only, calibrated on 200 training renders): 6.2 -> 5.2 ms on one thread, no
  clear gain on two, and the grid moved far: mean |error| 2.1 on the block-2 and block-4 taps
  (their spread 6.8 and 5.5), 0.7 on block 6 (spread 3.2). QOperator instead of QDQ, percentile
  calibration, or the depthwise convolutions kept in float (5.5 ms, error 1.5) were no better.
  The decoders read those taps directly, so the quality bar could not hold; and the project's
  AVX2-only and Intel machines gain less from int8 than this VNNI one.
- int8 for the 14x14 and 7x7 stages only (the same quantizer, the 28x28 tap and all before it
  in float32): 9.2 -> 6.7 ms on one thread, 6.8 -> 5.5-5.8 ms on two, the block-4 and block-6
  taps moved by 0.40 and 0.30 (a tenth of their spread); rescored with it, the model card's rows
  moved by up to 2 points either way, beyond the issue's 0.5 (the README's benchmark section
  has the rows). With 7-bit weights, as AVX2 without VNNI needs, up to 2.5 points.
- Session options: no memory arena raised the peak RSS (153 MB against 116 for a session run
  on 8 images); no memory pattern saved 5 MB. The defaults stay.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from model.devices import usable_cpus
from model.preprocessing import EncoderConfig, colour_statistics_array

log = logging.getLogger("model.onnx_encoder")

TOLERANCE = 1e-3  # largest difference from torch's grid the build check accepts (seen: 4e-5)


def session_options(threads: int) -> Any:
    """ONNX Runtime session options for the encoder: `threads` intra-op threads, every graph
    optimisation. A session of several threads spins them while it runs and stops them when the
    run ends (`force_spinning_stop`), so that they spin neither between runs (the bot's event loop
    and the decoders share the cores) nor sleep between the graph's operators: on this project's
    2-core VM a sleeping thread takes tens of microseconds to wake, and the CNN has dozens of
    operators. Measured (EPYC, 2 cores, one 224 px image, 200 interleaved rounds of 4 photos): the
    lone image's CNN and colour statistics 7.0 against 7.9 ms, a whole photo 15.6 against 16.8 ms;
    after 5 ms idle the CNN alone took 5.3 against 6.8 ms; spinning without the stop ran as fast
    but burned a core between runs (17.3 against 10.4 ms of CPU per run)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = max(1, threads), 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if 1 < threads <= usable_cpus() else "0"  # a descheduled spinner stalls the rest
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.force_spinning_stop", spin)
    return options


class OnnxEncoder:
    """`Encoder._forward` run by ONNX Runtime: pixels (B, 3, S, S) float32 -> grids
    (B, cells, features) float32, both numpy.

    One session, one intra-op thread. With `use_cpu_workers(n)` (Captioner.set_cpu_threads) the
    images of a batch are encoded side by side, one per worker thread (ONNX Runtime and numpy
    release the GIL), and a lone image's CNN runs on a second session of n intra-op threads,
    after its colour statistics.

    Measured for one 224 px image on 2 cores of an EPYC, at rest, medians of 300 interleaved
    runs: the CNN on one thread beside the numpy colour statistics 4.9 ms; the CNN on a
    two-thread session (spinning off, as the bot's event loop shares the cores) beside them
    4.9-5.2 ms, sequentially 4.7-5.4; the previous whole graph (colour statistics inside) on one
    thread 5.9-6.0 ms. There two intra-op threads barely helped the CNN (4.65 -> 4.62 ms median),
    but on the slower EPYC of a later session they did: a lone photo's encoding and captions took
    19.3 against 21.9 ms (p50 of 320 photos each, in alternating blocks of 40). The second session
    costs 19 MB. Its threads have since spun while it runs (`session_options`): with them
    sleeping between operators, two threads had run the CNN barely faster than one (8.3 against
    9.1 ms in one session's measurement), spinning 5.3-5.9 ms.
    """

    def __init__(
        self,
        path: str | Path,
        config: EncoderConfig | None = None,
        threads: int = 1,
        colour_in_graph: bool = False,
    ):
        self.path = Path(path)
        self.config = config or EncoderConfig()
        self.grid = self.config.grid
        self.num_cells = self.grid[0] * self.grid[1]
        self.feature_dim = self.config.feature_dim
        self.threads = max(1, threads)  # the session's intra-op threads
        self.colour_in_numpy = self.config.colour_stats and not colour_in_graph
        self.session: Any = self._session(self.threads)  # a broken file fails now
        self._pool: ThreadPoolExecutor | None = None
        self._solo: Any = None  # the lone image's session: `workers` intra-op threads
        self.workers = 1

    def _session(self, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        """The CNN on `threads` threads: pixels (B, 3, S, S) -> its grid share (B, cells, C)."""
        import onnxruntime

        session = onnxruntime.InferenceSession(
            str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        return lambda pixels: session.run(None, {name: pixels})[0]

    def runtime(self) -> str:
        import onnxruntime

        return f"ONNX Runtime {onnxruntime.__version__}"

    def use_cpu_workers(self, workers: int) -> None:
        """Encode a batch's images `workers` at a time, side by side, and a lone image on
        `workers` intra-op threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.workers = max(1, workers)
        self._pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="encoder")
            if self.workers > 1
            else None
        )
        solo = self.workers > self.threads
        self._solo = self._session(self.workers) if solo else None

    def _cnn(self, pixels: np.ndarray, session: Any = None) -> np.ndarray:
        return (session or self.session)(pixels)

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        cnn = self._cnn(pixels)
        if not self.colour_in_numpy:
            return cnn
        return np.concatenate([cnn, colour_statistics_array(pixels, self.config)], 2)

    def encode_array(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self._pool is None:
            return self._encode(pixels)
        if len(pixels) == 1:
            if not self.colour_in_numpy:
                return self._cnn(pixels, self._solo)
            # The colours first, then the CNN on every core: beside its spinning threads they
            # took 3.8 ms instead of 1, and the whole 0.3-0.4 ms longer (paired medians of 1500).
            colour = colour_statistics_array(pixels, self.config)
            return np.concatenate([self._cnn(pixels, self._solo), colour], 2)
        # One image per call: the activations of one stay in cache (a whole batch's spilled to
        # memory: batch 8 took 1.7x the time of eight batches of 1 in torch).
        rows = range(len(pixels))
        return np.concatenate(list(self._pool.map(lambda i: self._encode(pixels[i : i + 1]), rows)))

    def describe(self) -> str:
        side_by_side = (
            f"; a batch's images side by side on {self.workers} threads, a lone image on "
            f"{self.workers if self._solo else self.threads}"
        )
        return (
            f"{self.runtime()} ({self.path.name}, {self.threads} thread(s) "
            f"per image{side_by_side if self.workers > 1 else ''})"
        )


# ----------------------------------------------------------------------------------------------
# Exporting (torch): the serving bundle's builder calls these in its child process.


def export_module(module, example, out: Path, input_name: str, output_name: str) -> None:
    """`module` (torch) to ONNX at `out`, its batch dimension dynamic."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        module.eval(),
        (example,),
        input_names=[input_name],
        output_names=[output_name],
        dynamo=True,
        dynamic_shapes={input_name: {0: batch}},
        optimize=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always builds an ONNXProgram
    program.save(str(out))


def largest_difference(path: Path, module, inputs) -> float:
    """The largest difference between `module` (torch) and its graph at `path` on `inputs`, run
    at the batch of `inputs` and at batch 1."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.inference_mode():
        expected = module(inputs).float().numpy()
    worst = 0.0
    for rows in (slice(0, len(inputs)), slice(0, 1)):
        got = session.run(None, {name: inputs[rows].numpy()})[0]
        worst = max(worst, float(np.abs(got - expected[rows]).max()))
    return worst


def colour_fits_numpy(config: EncoderConfig) -> bool:
    """Whether the grid's cells tile the picture exactly (colour_statistics_array's case)."""
    rows, cols = config.grid
    return config.image_size % rows == 0 and config.image_size % cols == 0


def check_images(config: EncoderConfig) -> np.ndarray:
    """What an exported graph is checked against torch on (B, 3, S, S): two pictures of noise in
    the normalised range, then two rendered scenes."""
    from model.data.scenes import render_scene
    from model.preprocessing import preprocess_batch

    size = config.image_size
    noise = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    scenes = preprocess_batch([render_scene(seed)[1] for seed in range(2)], config)
    return np.concatenate([noise, scenes])


def export(encoder, out: Path) -> dict:
    """Export `encoder` (torch) to ONNX at `out`: its CNN share, or where the colour statistics
    cannot be had in numpy its whole `_forward`. Checks OnnxEncoder's grid against torch's on a
    test batch (rendered scenes and noise), raising beyond TOLERANCE; returns the manifest's info.
    """
    import torch

    colour_in_graph = encoder.config.colour_stats and not colour_fits_numpy(encoder.config)

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, images):
            if colour_in_graph:
                return self.encoder._forward(images)
            return self.encoder.cnn_features(images)

    images = check_images(encoder.config)
    export_module(Graph().eval(), torch.from_numpy(images[:2]), out, "images", "grid")
    with torch.inference_mode():
        expected = encoder._forward(torch.from_numpy(images)).numpy()
    runtime = OnnxEncoder(out, encoder.config, colour_in_graph=colour_in_graph)
    difference = max(
        float(np.abs(runtime.encode_array(images[rows]) - expected[rows]).max())
        for rows in (slice(0, len(images)), slice(0, 1))  # a batch, and batch 1
    )
    if not difference <= TOLERANCE:
        raise RuntimeError(
            f"the exported graph differs from torch by {difference:.2e} (> {TOLERANCE})"
        )
    return {"largest_difference": difference, "colour_in_graph": colour_in_graph}


def main(argv=None) -> int:
    """Build the serving bundle of a weights directory (the encoder's graph among it)."""
    from model import bundle

    return bundle.main(argv)


if __name__ == "__main__":
    sys.exit(main())
