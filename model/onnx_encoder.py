"""The encoder through ONNX Runtime: the CPU serving path's encoder, 3-4x faster than torch's.

The encoder's whole inference graph (EfficientNet-Lite0 up to block 6, the grid taps and the
colour statistics: `Encoder._forward`) is exported once with `torch.onnx.export(dynamo=True)` and
cached as `encoder-<sha256>.onnx`, the hash taken over the encoder's config and every weight, so
fine-tuned weights never meet a stale graph. Where no cached graph matches, the first load builds
one in a child process (the exporter imports a few hundred MB that the bot should not keep) and
checks it against torch on a test batch before it is used. If onnxruntime is missing, the export
fails or the check does, the encoder stays on torch and the reason is logged. Torch stays for
training and for GPUs.

    CAPTION_ENCODER_RUNTIME   auto (default: ONNX Runtime on CPUs where it works) or torch
    CAPTION_CACHE_DIR         where exported graphs go (default $XDG_CACHE_HOME/captionbot,
                              else ~/.cache/captionbot)

    python -m model.onnx_encoder [--weights weights]  # build the cached graph now (Docker, CI)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("model.onnx_encoder")

RUNTIME_ENV, CACHE_ENV = "CAPTION_ENCODER_RUNTIME", "CAPTION_CACHE_DIR"
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
TOLERANCE = 1e-3  # largest difference from torch's grid the build check accepts (seen: 4e-5)
EXPORT_TIMEOUT_S = 600


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captionbot"


def weights_key(encoder) -> str:
    """sha256 of what the graph depends on: the encoder's config and every weight."""
    digest = hashlib.sha256(json.dumps([EXPORT_VERSION, encoder.config.to_dict()]).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OnnxEncoder:
    """`Encoder._forward` run by an ONNX Runtime session: (B, 3, S, S) -> (B, cells, features).

    intra-op threads: 1 when the encoder's worker pool runs a batch's images side by side (one
    core each), else torch's thread count; spinning is off, the bot's event loop shares the cores.
    """

    def __init__(self, path: Path, threads: int = 1):
        import onnxruntime

        self.path, self._ort, self.threads = Path(path), onnxruntime, 0
        self.session: Any = None  # an onnxruntime.InferenceSession once use_threads ran
        self.use_threads(threads)

    def use_threads(self, threads: int) -> None:
        threads = max(1, threads)
        if threads == self.threads:
            return
        options = self._ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = self._ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = self._ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: pixels})[0])

    def describe(self) -> str:
        return (
            f"ONNX Runtime {self._ort.__version__} ({self.path.name}, "
            f"{self.threads} thread(s) per call)"
        )


def attach(encoder) -> str:
    """Run `encoder` through ONNX Runtime where it can; returns a line saying which runtime is
    used."""
    encoder.runtime = None
    wanted = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    if wanted == "torch":
        return f"torch ({RUNTIME_ENV}=torch)"
    if wanted != "auto":
        log.warning("%s=%s is neither auto nor torch: taken as auto", RUNTIME_ENV, wanted)
    if next(encoder.parameters()).device.type != "cpu":
        return "torch (not on a CPU)"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("encoder on torch: onnxruntime is not installed")
        return "torch (onnxruntime not installed)"
    try:
        path = cache_dir() / f"encoder-{weights_key(encoder)}.onnx"
        if not path.exists():
            build(encoder, path)
        encoder.runtime = OnnxEncoder(
            path, threads=1 if encoder._pool is not None else torch.get_num_threads()
        )
    except (
        Exception
    ) as error:  # the exporter, the check, a read-only cache, a broken file: all fall back
        reason = (str(error).strip().splitlines() or [""])[-1]
        log.warning(
            "encoder on torch: no ONNX Runtime graph (%s: %s)", type(error).__name__, reason
        )
        encoder.runtime = None
        return f"torch (ONNX Runtime unavailable: {type(error).__name__})"
    log.info("encoder on %s", encoder.runtime.describe())
    return encoder.runtime.describe()


def build(encoder, path: Path) -> None:
    """Export `encoder` to `path` in a child process, checked against torch there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as work:
        state = Path(work) / "encoder.pt"
        torch.save({"config": encoder.config.to_dict(), "state_dict": encoder.state_dict()}, state)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "model.onnx_encoder",
                "--from-state",
                str(state),
                "--out",
                str(Path(work) / path.name),
            ],
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"export failed: {(done.stderr or done.stdout).strip()[-2000:]}")
        os.replace(Path(work) / path.name, path)  # atomic: a reader never sees half a file
    log.info("encoder exported to %s in %.0f s", path, time.perf_counter() - started)


def export(encoder, out: Path) -> float:
    """Export `encoder._forward` (torch) to ONNX at `out`; returns the largest difference from
    torch on a test batch, and raises if it exceeds TOLERANCE."""
    import onnxruntime

    encoder.runtime = None

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, images):
            return self.encoder._forward(images)

    size = encoder.config.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        Graph().eval(),
        (images,),
        input_names=["images"],
        output_names=["grid"],
        dynamo=True,
        dynamic_shapes={"images": {0: batch}},
        optimize=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always builds an ONNXProgram
    program.save(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = encoder._forward(images)
    for rows in (slice(0, 2), slice(0, 1)):  # the batch of the export, and another size
        got = torch.from_numpy(session.run(None, {"images": images[rows].numpy()})[0])
        difference = (got - expected[rows]).abs().max().item()
        if not difference <= TOLERANCE:
            raise RuntimeError(
                f"the exported graph differs from torch by {difference:.2e} (> {TOLERANCE})"
            )
    return difference


def main(argv=None) -> int:
    import argparse

    from model.encoder import Encoder, EncoderConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", help="a weights directory: build its encoder's cached graph")
    parser.add_argument(
        "--from-state", dest="from_state", help=argparse.SUPPRESS
    )  # build()'s child
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_state:
        saved = torch.load(args.from_state, map_location="cpu", weights_only=True)
        encoder = Encoder(EncoderConfig(**saved["config"]))
        encoder.load_state_dict(saved["state_dict"])
        difference = export(encoder, Path(args.out))
        print(f"exported, largest difference from torch {difference:.2e}")
        return 0
    from model.captioner import DEFAULT_WEIGHTS_DIR, Captioner

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    encoder = Captioner.load(
        args.weights or DEFAULT_WEIGHTS_DIR
    ).encoder  # attaches (and builds) the graph
    return 0 if encoder.runtime is not None else 1


if __name__ == "__main__":
    sys.exit(main())
