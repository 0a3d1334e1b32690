"""bench/slim_top.py: the narrowed encoder top it measures is the shipped top minus the dropped
channels, runs in the serving runtime, and its distillation learns."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import slim_top  # noqa: E402
from model.data.scenes import render_scene  # noqa: E402
from model.encoder import Encoder  # noqa: E402
from model.preprocessing import LITE0_TAP_CHANNELS, EncoderConfig, preprocess_array  # noqa: E402


def _kept_channels(block, small) -> list[int]:
    """Which of `block`'s expansion channels its narrowed copy `small` kept, found by their
    expansion weights."""
    rows = block._expand_conv.weight.flatten(1)
    return [int((rows == row).all(1).nonzero()[0]) for row in small._expand_conv.weight.flatten(1)]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(EncoderConfig.of_weights(slim_top.WEIGHTS))


@pytest.fixture(scope="module")
def maps(encoder) -> torch.Tensor:
    pixels = np.stack([preprocess_array(render_scene(seed)[1]) for seed in range(24)])
    with torch.inference_mode():
        return slim_top.lower_cnn(encoder, torch.from_numpy(pixels)).clone()


def test_the_lower_cnn_gives_the_block4_share_of_the_served_grid(encoder, maps):
    low, mid, _ = LITE0_TAP_CHANNELS
    pixels = torch.from_numpy(preprocess_array(render_scene(0)[1]))[None]
    with torch.inference_mode():
        grid = encoder.cnn_features(pixels)  # (1, 196, 472)
    share = grid[0, :, low : low + mid].T.reshape(mid, 14, 14)
    assert torch.allclose(share, maps[0], atol=1e-5)


def test_a_narrowed_top_is_the_shipped_one_without_its_dropped_channels(maps):
    teacher = slim_top.shipped_top()
    slim = slim_top.narrowed(teacher, maps, keep=0.5)
    masked = slim_top.shipped_top()
    for block, small in zip(masked.blocks, slim.blocks):
        width = block._depthwise_conv.out_channels
        kept = small._depthwise_conv.out_channels
        assert kept % 8 == 0 and abs(kept - width / 2) <= 4
        # the dropped channels lose their projection column, which removes all they contribute
        chosen = _kept_channels(block, small)
        dropped = sorted(set(range(width)) - set(chosen))
        block._project_conv.weight.data[:, dropped] = 0
    with torch.inference_mode():
        assert torch.allclose(slim(maps), masked(maps), atol=1e-4)
        assert not torch.allclose(slim(maps), teacher(maps), atol=1e-2)


def test_it_keeps_the_channels_that_matter_most(maps):
    teacher = slim_top.shipped_top()
    scores = slim_top.channel_importance(teacher, maps)
    slim = slim_top.narrowed(teacher, maps, keep=0.25)
    for score, block, small in zip(scores, teacher.blocks, slim.blocks):
        chosen = _kept_channels(block, small)
        assert score[chosen].min() >= torch.topk(score, len(chosen)).values.min()
        assert chosen == sorted(chosen)


def test_litert_runs_an_encoder_with_a_narrowed_top_as_torch_does(maps, tmp_path):
    from model.lite_encoder import _Interpreters, build
    from model.onnx_encoder import TOLERANCE

    config = EncoderConfig.of_weights(slim_top.WEIGHTS)
    encoder = slim_top.with_top(
        Encoder(config), slim_top.narrowed(slim_top.shipped_top(), maps, 0.5)
    )
    pixels = np.stack([preprocess_array(render_scene(seed)[1]) for seed in (3, 4)])
    with torch.inference_mode():
        expected = encoder.cnn_features(torch.from_numpy(pixels)).numpy()
    graph = tmp_path / "slim.tflite"
    graph.write_bytes(build(encoder))
    got = _Interpreters(graph, 1)(pixels)
    assert got.shape == expected.shape == (2, 196, 472)
    assert np.abs(got - expected).max() <= TOLERANCE


def test_distillation_brings_the_narrow_top_closer_to_the_shipped_one(maps):
    torch.manual_seed(0)
    teacher = slim_top.shipped_top()
    slim = slim_top.narrowed(teacher, maps[:16], keep=0.25)
    before = slim_top.distil(
        slim, teacher, maps[:16], maps[16:], epochs=0, batch=8, log=lambda _: None
    )
    after = slim_top.distil(
        slim, teacher, maps[:16], maps[16:], epochs=4, batch=8, log=lambda _: None
    )
    assert after < 0.9 * before


def test_the_learning_rate_warms_up_then_decays_to_zero():
    steps = 1000
    lrs = [slim_top.get_lr(step, steps) for step in range(steps + 1)]
    assert lrs[0] == pytest.approx(1e-5) and max(lrs) == pytest.approx(1e-3)
    assert lrs[99] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))
