"""The encoder's CNN written as a TFLite graph and run by LiteRT (model/lite_encoder.py): the
same grid as torch for other grid layouts than the bundled one, correct under concurrent callers,
and ONNX Runtime's encoder wherever LiteRT is missing. (The bundled weights' graph against torch,
and the captions it gives: tests/test_onnx_encoder.py, which runs on both runtimes.)"""

import os
import threading

import numpy as np
import pytest

from model import bundle as serving
from model import lite_encoder
from model.captioner import DEFAULT_WEIGHTS_DIR
from model.data.scenes import render_scene
from model.lite_encoder import LiteEncoder, supported
from model.onnx_encoder import TOLERANCE, OnnxEncoder
from model.preprocessing import EncoderConfig, preprocess_batch


def test_supported_layouts():
    assert supported(EncoderConfig())  # 14x14 cells: block 2 averaged, block 6 repeated
    assert supported(EncoderConfig(cell_px=32))  # 7x7: blocks 2 and 4 averaged
    assert not supported(EncoderConfig(cell_px=48, input_px=240))  # block 6 at 8x8 onto 5x5
    assert not supported(EncoderConfig(backbone="resnet50"))


def test_a_grid_of_32_px_cells_equals_torch(tmp_path):
    """Every tap averaged onto 7x7 cells (the bundled 14x14 grid repeats block 6 instead)."""
    from model.encoder import Encoder

    encoder = Encoder(EncoderConfig(cell_px=32))
    info = lite_encoder.export(encoder, tmp_path / "encoder.tflite")
    assert info is not None and info["largest_difference"] <= TOLERANCE
    assert LiteEncoder(tmp_path / "encoder.tflite", encoder.config).grid == (7, 7)


def test_export_checks_the_graph_against_torch(tmp_path, monkeypatch):
    """A graph that computes something else is refused before a bundle could serve it."""
    from model.encoder import Encoder

    encoder = Encoder(EncoderConfig())
    written = lite_encoder.build

    def one_weight_off(encoder):
        stem = encoder.network._conv_stem
        original = stem.weight.detach().clone()
        stem.weight.data[0, 0, 0, 0] += 0.5
        try:
            return written(encoder)
        finally:
            stem.weight.data.copy_(original)

    monkeypatch.setattr(lite_encoder, "build", one_weight_off)
    with pytest.raises(RuntimeError, match="differs from torch"):
        lite_encoder.export(encoder, tmp_path / "encoder.tflite")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(serving.CACHE_ENV, str(tmp_path_factory.mktemp("bundle-cache")))
        return serving.load_bundle(DEFAULT_WEIGHTS_DIR)


def test_callers_at_once_each_get_their_own_grid(bundle):
    """An interpreter runs one call at a time: callers on several threads at once (the encoder's
    workers, a lone photo's caller) each get an interpreter of their own, and their own grid."""
    encoder = LiteEncoder(bundle.file("encoder.tflite"), bundle.config)
    batches = [
        preprocess_batch([render_scene(40_000_000 + seed)[1]], bundle.config) for seed in range(4)
    ]
    expected = [encoder.encode_array(batch) for batch in batches]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(len(batches))}
    start = threading.Barrier(len(batches))

    def encode(i: int) -> None:
        start.wait()
        for _ in range(5):
            results[i].append(encoder.encode_array(batches[i]))

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, grids in results.items():
        assert len(grids) == 5 and all(np.array_equal(grid, expected[i]) for grid in grids)
    assert not np.array_equal(expected[0], expected[1])


def test_without_litert_the_bundle_serves_onnx_runtimes_encoder(bundle, monkeypatch):
    assert isinstance(serving.EncoderSide.from_bundle(bundle).encoder, LiteEncoder)
    monkeypatch.setattr(lite_encoder, "available", lambda: False)
    assert type(serving.EncoderSide.from_bundle(bundle).encoder) is OnnxEncoder
    assert lite_encoder.export(object(), bundle.directory / "unused.tflite") is None


def test_the_first_interpreters_banner_is_kept_out_of_stderr_and_nothing_else(capfd):
    """LiteRT's C++ logger announces its first interpreter on stderr, a line that is not JSON
    in the bot's LOG_FORMAT=json output; what else is written to stderr meanwhile stays."""
    with lite_encoder._without_banner():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"ERROR: something else\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "ERROR: something else\nafter\n"
