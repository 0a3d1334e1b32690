"""The encoder through ONNX Runtime (model/onnx_encoder.py): the same grid and captions as torch,
a cache keyed by the weights, and torch whenever the exported graph cannot be had."""

import logging
import subprocess
import sys

import pytest
import torch
from PIL import Image

from model import onnx_encoder
from model.captioner import Captioner
from model.data.scenes import render_scene
from model.encoder import Encoder, preprocess

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def captioners(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(onnx_encoder.CACHE_ENV, str(cache))
        onnx = Captioner.load()  # builds the graph into the empty cache
        mp.setenv(onnx_encoder.RUNTIME_ENV, "torch")
        plain = Captioner.load()
    assert onnx.encoder.runtime is not None and plain.encoder.runtime is None
    return onnx, plain


def pictures() -> list[Image.Image]:
    images = [render_scene(30_000_000 + seed)[1] for seed in range(6)]
    skimage_data = pytest.importorskip("skimage.data")
    return images + [
        Image.fromarray(skimage_data.chelsea()),
        Image.fromarray(skimage_data.coffee()),
    ]


def test_onnx_grid_equals_torch_within_tolerance(captioners):
    onnx, plain = captioners
    batch = torch.stack([preprocess(image) for image in pictures()])
    with torch.inference_mode():
        got, expected = onnx.encoder(batch), plain.encoder(batch)
    assert got.shape == expected.shape == (len(batch), 196, 488)
    torch.testing.assert_close(got, expected, rtol=0, atol=onnx_encoder.TOLERANCE)


def test_captions_are_the_same_with_either_runtime(captioners):
    onnx, plain = captioners
    images = pictures()
    for kind in ("attention", "baseline"):
        assert [c.text for c in onnx.greedy(onnx.encode(images), kind)] == [
            c.text for c in plain.greedy(plain.encode(images), kind)
        ]


def test_second_load_uses_the_cached_graph(captioners, cache, monkeypatch):
    assert len(list(cache.glob("encoder-*.onnx"))) == 1
    monkeypatch.setenv(onnx_encoder.CACHE_ENV, str(cache))
    monkeypatch.setattr(onnx_encoder, "build", lambda *a: pytest.fail("rebuilt a cached graph"))
    encoder = captioners[1].encoder
    try:
        assert onnx_encoder.attach(encoder).startswith("ONNX Runtime")
    finally:
        encoder.runtime = None


def test_cache_key_is_the_weights(captioners):
    onnx, plain = captioners
    assert onnx_encoder.weights_key(onnx.encoder) == onnx_encoder.weights_key(plain.encoder)
    weight = plain.encoder.network._blocks[12]._project_conv.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1e-3
        changed = onnx_encoder.weights_key(plain.encoder)
        weight[0, 0, 0, 0] -= 1e-3
    assert changed != onnx_encoder.weights_key(onnx.encoder)


def test_threads_follow_the_worker_pool(captioners):
    encoder = captioners[0].encoder
    try:
        encoder.use_cpu_workers(2)  # images side by side: one thread each
        assert encoder.runtime.threads == 1
        encoder.use_cpu_workers(1)
        assert encoder.runtime.threads == torch.get_num_threads()
    finally:
        encoder.use_cpu_workers(1)


@pytest.fixture
def bare_encoder():
    return Encoder()


def test_failed_export_falls_back_to_torch_and_says_why(
    bare_encoder, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv(onnx_encoder.CACHE_ENV, str(tmp_path))

    def broken(encoder, path):
        raise RuntimeError("export failed: no exporter here")

    monkeypatch.setattr(onnx_encoder, "build", broken)
    with caplog.at_level(logging.WARNING, logger="model.onnx_encoder"):
        assert onnx_encoder.attach(bare_encoder).startswith("torch")
    assert bare_encoder.runtime is None
    assert "no exporter here" in caplog.text


def test_corrupt_cached_graph_falls_back_to_torch(bare_encoder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(onnx_encoder.CACHE_ENV, str(tmp_path))
    (tmp_path / f"encoder-{onnx_encoder.weights_key(bare_encoder)}.onnx").write_bytes(
        b"not a graph"
    )
    with caplog.at_level(logging.WARNING, logger="model.onnx_encoder"):
        assert onnx_encoder.attach(bare_encoder).startswith("torch")
    assert bare_encoder.runtime is None and "encoder on torch" in caplog.text


def test_runtime_torch_is_honoured(bare_encoder, monkeypatch):
    monkeypatch.setenv(onnx_encoder.RUNTIME_ENV, "torch")
    monkeypatch.setattr(
        onnx_encoder, "build", lambda *a: pytest.fail("exported although torch was asked for")
    )
    assert onnx_encoder.attach(bare_encoder) == f"torch ({onnx_encoder.RUNTIME_ENV}=torch)"
    assert bare_encoder.runtime is None


def test_serving_process_does_not_import_the_exporter(captioners, cache):
    code = (
        "import sys; from model.captioner import Captioner; c = Captioner.load(); "
        "print(c.encoder.runtime is not None, any(m.split('.')[0] in ('onnx', 'onnxscript') for m "
        "in sys.modules))"
    )
    env = {**__import__("os").environ, onnx_encoder.CACHE_ENV: str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["True", "False"]
