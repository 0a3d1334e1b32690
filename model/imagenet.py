"""What the ImageNet classifier inside the encoder sees: top-k ImageNet labels from a cached grid.

The encoder's grid keeps EfficientNet-Lite0's block-4 map (112 channels, 14x14) at full
resolution, so the classifier's remaining layers — the ORIGINAL blocks 5 and 6 from the wheel
(not the ones fine-tuned on scenes, which call a cup of coffee a "chambered nautilus"), the 1x1
head convolution and the 1000-way classifier — run from a cached `Encoded` alone, without the
picture. They cost a few milliseconds per image, so callers run them only when they need labels
(out-of-domain photos, or when asked).

The class names are torchvision's ImageNet-1k list (the order of the wheel's classifier), saved
once into `imagenet_classes.json` beside this file (tests/test_imagenet.py checks it still
equals torchvision's), so the bot never imports torchvision for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.json"
BLOCK4 = (40, 112)  # the block-4 share of a grid cell: its first channel, its channel count


@dataclass(frozen=True)
class Label:
    label: str  # an ImageNet class name, e.g. "Egyptian cat"
    p: float  # its softmax probability


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return tuple(json.loads(CLASSES_FILE.read_text()))


def block4_maps(grids: np.ndarray) -> np.ndarray:
    """grids (B, S*S, D) of EfficientNet-Lite0's 16 px cells -> their block-4 maps
    (B, 112, S, S) float32, the head's input."""
    grids = np.asarray(grids)
    first, channels = BLOCK4
    batch, cells, _ = grids.shape
    side = int(round(cells**0.5))
    share = grids[:, :, first : first + channels].astype(np.float32)
    return np.ascontiguousarray(share.transpose(0, 2, 1).reshape(batch, channels, side, side))


def top_labels(logits: np.ndarray, k: int = 5) -> list[list[Label]]:
    """ImageNet logits (B, 1000) -> the top k labels of each, with softmax probabilities."""
    logits = np.asarray(logits, dtype=np.float32)
    exp = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = exp / exp.sum(1, keepdims=True)
    k = min(k, probabilities.shape[1])
    names = class_names()
    out = []
    for row in probabilities:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([Label(names[int(i)], float(row[i])) for i in top])
    return out


class OnnxImageNetHead:
    """The head exported to ONNX (the serving bundle's imagenet_head.onnx, built by
    model/bundle.py from `model.encoder.ImageNetHead`), run by ONNX Runtime on one thread: no
    torch."""

    def __init__(self, path: str | Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session: Any = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, block4: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: block4})[0]

    def labels(self, grids: np.ndarray, k: int = 5) -> list[list[Label]]:
        return top_labels(self.logits(block4_maps(grids)), k)


class TorchImageNetHead:
    """The same head in torch (`model.encoder.ImageNetHead`): for captioners that keep the
    encoder in torch (untrained ones, GPUs, the fallback when ONNX Runtime cannot be had)."""

    def __init__(self):
        from model.encoder import ImageNetHead

        self.module = ImageNetHead()

    def logits(self, block4: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(block4)).numpy()

    def labels(self, grids: np.ndarray, k: int = 5) -> list[list[Label]]:
        return top_labels(self.logits(block4_maps(grids)), k)
