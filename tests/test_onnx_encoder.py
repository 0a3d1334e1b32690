"""The encoder through LiteRT or ONNX Runtime, from the serving bundle (model/lite_encoder.py,
model/onnx_encoder.py, model/bundle.py): the same grid and captions as torch on either runtime, a
bundle keyed by the weights and loaded without torch, and torch whenever the bundle cannot be
had."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from bot_helpers import without_torch
from PIL import Image

from model import bundle as serving
from model.captioner import DEFAULT_WEIGHTS_DIR, Captioner
from model.data.scenes import render_scene
from model.lite_encoder import LiteEncoder
from model.onnx_encoder import TOLERANCE, OnnxEncoder
from model.preprocessing import EncoderConfig, preprocess_batch

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bundle-cache")


RUNTIMES = ("litert", "onnx")  # the bundle's encoders: the default, CAPTION_ENCODER_RUNTIME=onnx


@pytest.fixture(scope="module")
def captioners(cache):
    """({runtime: captioner} for RUNTIMES, the torch captioner)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(serving.CACHE_ENV, str(cache))
        fast = {"litert": Captioner.load()}  # builds the bundle into the empty cache
        mp.setenv(serving.RUNTIME_ENV, "onnx")
        fast["onnx"] = Captioner.load()
        mp.setenv(serving.RUNTIME_ENV, "torch")
        plain = Captioner.load()
    assert isinstance(fast["litert"].encoder, LiteEncoder)
    assert type(fast["onnx"].encoder) is OnnxEncoder
    assert fast["litert"].encoder.describe().startswith("LiteRT ")
    assert fast["onnx"].encoder.describe().startswith("ONNX Runtime ")
    assert plain.encoder.describe() == "torch"
    return fast, plain


def cells() -> int:
    """The bundled weights' grid cells (100 at their 160 px input)."""
    rows, cols = EncoderConfig.of_weights(DEFAULT_WEIGHTS_DIR).grid
    return rows * cols


def pictures() -> list[Image.Image]:
    images = [render_scene(30_000_000 + seed)[1] for seed in range(6)]
    skimage_data = pytest.importorskip("skimage.data")
    return images + [
        Image.fromarray(skimage_data.chelsea()),
        Image.fromarray(skimage_data.coffee()),
    ]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_grid_equals_torch_within_tolerance(captioners, runtime):
    fast, plain = captioners[0][runtime], captioners[1]
    batch = preprocess_batch(pictures(), fast.side.config)
    got, expected = fast.encoder.encode_array(batch), plain.encoder.encode_array(batch)
    assert got.shape == expected.shape == (len(batch), cells(), 488)
    assert got.dtype == expected.dtype == np.float32
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_captions_domain_and_labels_are_the_same_as_torchs(captioners, runtime):
    fast, plain = captioners[0][runtime], captioners[1]
    images = pictures()
    quick, slow = fast.encode(images), plain.encode(images)
    assert all(e.grid.dtype == np.float16 and e.grid.shape == (cells(), 488) for e in quick)
    for kind in ("attention", "baseline"):
        assert [c.text for c in fast.greedy(quick, kind)] == [
            c.text for c in plain.greedy(slow, kind)
        ]
    np.testing.assert_allclose(
        [v.score for v in fast.domain(quick)], [v.score for v in plain.domain(slow)], rtol=1e-3
    )
    assert [v.in_domain for v in fast.domain(quick)] == [v.in_domain for v in plain.domain(slow)]
    assert [[label.label for label in labels] for labels in fast.imagenet_labels(quick)] == [
        [label.label for label in labels] for labels in plain.imagenet_labels(slow)
    ]


def test_the_grids_repeat_the_columns_their_config_says(captioners):
    """EncoderConfig.repeated_columns, which the attention decoder reads once a block of cells
    (model/decoding.py), holds exactly on both runtimes' grids, and the other taps' do not."""
    images = pictures()
    for captioner in [*captioners[0].values(), captioners[1]]:
        config = captioner.side.config
        first, end, k = config.repeated_columns
        rows, cols = config.grid
        grid = captioner.encoder.encode_array(preprocess_batch(images, config))
        blocks = grid.reshape(len(images), rows // k, k, cols // k, k, -1)
        first_cell = np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape)
        assert np.array_equal(blocks[..., first:end], first_cell[..., first:end])
        assert not np.array_equal(blocks[..., :first], first_cell[..., :first])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_side_by_side_encoding_gives_the_same_grid(captioners, runtime):
    encoder = captioners[0][runtime].encoder
    batch = preprocess_batch(pictures()[:3], encoder.config)
    try:
        encoder.use_cpu_workers(1)
        alone = encoder.encode_array(batch)
        encoder.use_cpu_workers(2)
        assert "side by side on 2 threads, a lone image on 2" in encoder.describe()
        side_by_side = encoder.encode_array(batch)
        one = encoder.encode_array(batch[:1])  # the colours, then the CNN on 2 threads
    finally:
        encoder.use_cpu_workers(1)
    assert np.array_equal(side_by_side, alone) and np.array_equal(one, alone[:1])


def test_second_load_uses_the_cached_bundle(captioners, cache, monkeypatch):
    assert len(list(cache.glob("bundle-*"))) == 1
    monkeypatch.setenv(serving.CACHE_ENV, str(cache))
    monkeypatch.setattr(serving, "build_bundle", lambda *a: pytest.fail("rebuilt a cached bundle"))
    bundle = serving.load_bundle(DEFAULT_WEIGHTS_DIR)
    assert set(bundle.manifest["artifacts"]) == {
        "encoder.onnx",
        "encoder.tflite",
        "imagenet_head.onnx",
        "domain.npz",
        "baseline.npz",
        "attention.npz",
    }
    for graph in ("encoder.onnx", "encoder.tflite"):
        assert bundle.manifest["artifacts"][graph]["largest_difference"] <= TOLERANCE


def test_bundle_key_is_the_weight_files(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR, weights)
    key = serving.bundle_key(weights)
    assert key == serving.bundle_key(DEFAULT_WEIGHTS_DIR)
    (weights / "scores.json").write_text("{}")  # the card's scores: not an input
    assert serving.bundle_key(weights) == key
    top = weights / "encoder_top.pt"
    data = bytearray(top.read_bytes())
    data[-100] ^= 1
    top.write_bytes(bytes(data))
    assert serving.bundle_key(weights) != key


def test_failed_build_falls_back_to_torch_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(serving.CACHE_ENV, str(tmp_path))

    def broken(weights_dir, directory):
        raise RuntimeError("bundle build failed: no exporter here")

    monkeypatch.setattr(serving, "build_bundle", broken)
    with caplog.at_level(logging.WARNING, logger="model.captioner"):
        captioner = Captioner.load()
    assert captioner.encoder.describe() == "torch" and "no exporter here" in caplog.text
    assert captioner.has_domain_check  # domain.pt, read by torch


def _with_a_damaged(graph: str, cache, tmp_path, monkeypatch) -> None:
    (built,) = cache.glob("bundle-*")
    broken = tmp_path / built.name
    shutil.copytree(built, broken)
    (broken / graph).write_bytes(b"not a graph")
    monkeypatch.setenv(serving.CACHE_ENV, str(tmp_path))


def test_a_damaged_tflite_graph_falls_back_to_onnx_runtime(
    captioners, cache, tmp_path, monkeypatch, caplog
):
    _with_a_damaged("encoder.tflite", cache, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="model.bundle"):
        captioner = Captioner.load()
    assert type(captioner.encoder) is OnnxEncoder and "LiteRT failed" in caplog.text
    image = render_scene(30_000_000)[1]
    fast = captioners[0]["litert"]
    assert captioner.greedy(captioner.encode([image]))[0].text == (
        fast.greedy(fast.encode([image]))[0].text
    )


def test_a_damaged_onnx_graph_falls_back_to_torch(captioners, cache, tmp_path, monkeypatch, caplog):
    _with_a_damaged("encoder.onnx", cache, tmp_path, monkeypatch)
    monkeypatch.setenv(serving.RUNTIME_ENV, "onnx")
    with caplog.at_level(logging.WARNING, logger="model.captioner"):
        captioner = Captioner.load()
    assert captioner.encoder.describe() == "torch" and "encoder on torch" in caplog.text


def test_runtime_torch_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv(serving.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(serving.RUNTIME_ENV, "torch")
    monkeypatch.setattr(
        serving, "build_bundle", lambda *a: pytest.fail("built although torch was asked for")
    )
    assert Captioner.load().encoder.describe() == "torch"


def run_python(code: str, cache) -> str:
    env = {**os.environ, serving.CACHE_ENV: str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_encoder_side_runs_from_the_bundle_without_torch(captioners, cache):
    """The serving path's encoder side: preprocess, encode, domain check and ImageNet labels, with
    numpy and onnxruntime only (import torch alone costs about 500 MB of resident memory)."""
    code = (
        "import json, sys\n"
        "from PIL import Image\n"
        "from model.bundle import EncoderSide, load_bundle\n"
        "from model.data.scenes import render_scene\n"
        "import skimage.data\n"
        "side = EncoderSide.from_bundle(load_bundle('weights', build=False))\n"
        "side.encoder.use_cpu_workers(2)\n"
        "images = [render_scene(30_000_000)[1], Image.fromarray(skimage.data.chelsea())]\n"
        "grids = side.encode(images)\n"
        "verdicts = side.domain(grids)\n"
        "labels = side.imagenet_labels(grids, 3)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'shape': list(grids[0].shape),\n"
        "    'dtype': str(grids[0].dtype), 'in_domain': [v.in_domain for v in verdicts],\n"
        "    'cat': [label.label for label in labels[1]]}))\n"
    )
    pytest.importorskip("skimage")
    out = json.loads(run_python(code, cache).strip().splitlines()[-1])
    assert out["torch"] is False
    assert out["shape"] == [cells(), 488] and out["dtype"] == "float16"
    assert out["in_domain"] == [True, False]
    assert out["cat"][0] == "Egyptian cat"


def test_the_captioner_serves_from_the_bundle_without_torch(captioners, cache):
    """Captioner.load on a CPU: encoder, domain check, labels and both decoders from the bundle,
    with numpy and onnxruntime only, and the same captions as the weights read by torch."""
    code = (
        "import json, sys\n"
        "from model.captioner import Captioner\n"
        "from model.data.scenes import render_scene\n"
        "c = Captioner.load(device='auto')\n"
        "encoded = c.encode([render_scene(30_000_000 + seed)[1] for seed in range(4)])\n"
        "both = c.captions(encoded, 3, seed=5)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'device': c.device,\n"
        "    'attention': [x.attention.text for x in both],\n"
        "    'baseline': [x.baseline.text for x in both], 'samples': [x.samples for x in both],\n"
        "    'beam': [x.text for x in c.beam(encoded, 3)],\n"
        "    'in_domain': [v.in_domain for v in c.domain(encoded)]}))\n"
    )
    out = json.loads(run_python(code, cache).strip().splitlines()[-1])
    assert out["torch"] is False and out["device"] == "cpu"
    _, plain = captioners  # the same weights through torch, the same decoding code
    encoded = plain.encode([render_scene(30_000_000 + seed)[1] for seed in range(4)])
    assert out["attention"] == [c.text for c in plain.greedy(encoded, "attention")]
    assert out["baseline"] == [c.text for c in plain.greedy(encoded, "baseline")]
    assert out["beam"] == [c.text for c in plain.beam(encoded, 3)]
    assert all(len(samples) == 3 for samples in out["samples"]) and all(out["in_domain"])


def test_serving_process_does_not_import_the_exporter(captioners, cache):
    """onnxscript (torch's exporter) stays out; onnx itself builds the decoders' small graphs."""
    code = (
        "import sys; from model.captioner import Captioner; c = Captioner.load(); "
        "print(c.encoder.describe().startswith('LiteRT'), "
        "any(m.split('.')[0] in ('onnxscript', 'torch') for m in sys.modules))"
    )
    assert run_python(code, cache).split() == ["True", "False"]


def test_one_more_artifact_is_one_more_entry(tmp_path, monkeypatch):
    """How the decoders' numpy tables will join the bundle: a builder in ARTIFACTS (it runs in
    the child), read back by Bundle.arrays; the key changes with the list, so old bundles are not
    reused."""

    def tables(weights_dir, path):
        np.savez(path, w=np.arange(6, dtype=np.float32).reshape(2, 3))
        return {"arrays": 1}

    key = serving.bundle_key(DEFAULT_WEIGHTS_DIR)
    monkeypatch.setattr(serving, "ARTIFACTS", {"decoders.npz": tables})
    assert serving.bundle_key(DEFAULT_WEIGHTS_DIR) != key
    manifest = serving.build_here(DEFAULT_WEIGHTS_DIR, tmp_path / "bundle")
    bundle = serving.Bundle(tmp_path / "bundle", manifest)
    assert bundle.has("decoders.npz") and not bundle.has("encoder.onnx")
    assert bundle.arrays("decoders.npz")["w"].shape == (2, 3)


def test_the_docker_build_command_finds_or_builds_the_bundle(captioners, cache):
    """The Dockerfile's `python -m model.bundle --weights weights` builds the bundle at image
    build time; with the bundle cached it only names it."""
    env = {**os.environ, serving.CACHE_ENV: str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "model.bundle", "--weights", str(DEFAULT_WEIGHTS_DIR)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (built,) = cache.glob("bundle-*")
    assert str(built) in done.stdout and "encoder.tflite" in done.stdout


def test_a_cached_bundle_serves_where_torch_is_not_installed(captioners, cache, tmp_path):
    code = (
        "from model.captioner import Captioner; from model.data.scenes import render_scene\n"
        "c = Captioner.load()\n"
        "print(c.greedy(c.encode([render_scene(30_000_000)[1]]), 'attention')[0].text)\n"
    )
    env = {**os.environ, "PYTHONPATH": without_torch(tmp_path), serving.CACHE_ENV: str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    _, plain = captioners
    expected = plain.greedy(plain.encode([render_scene(30_000_000)[1]]), "attention")[0].text
    assert done.stdout.strip().splitlines()[-1] == expected


def test_without_torch_and_without_a_bundle_the_error_says_what_is_missing(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": without_torch(tmp_path),
        serving.CACHE_ENV: str(tmp_path / "empty"),
    }
    done = subprocess.run(
        [sys.executable, "-c", "from model.captioner import Captioner; Captioner.load()"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("model.devices.TorchMissing: serving ")
    assert "without a serving bundle needs torch" in last
    assert "rebuild the image" in last


def test_serving_runs_numpy_products_on_one_blas_thread(captioners, cache):
    """set_cpu_threads (as the bot calls it) leaves numpy's BLAS one thread: its own pool spun
    on the cores the worker's threads need."""
    code = (
        "import json, os\n"
        "from threadpoolctl import threadpool_info\n"
        "from model.captioner import Captioner\n"
        "def blas():\n"
        "    return [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "c = Captioner.load()\n"
        "before = blas()\n"
        "cores = len(os.sched_getaffinity(0))\n"
        "c.set_cpu_threads(cores)\n"
        "print(json.dumps({'before': before, 'after': blas(), 'cores': cores}))\n"
    )
    out = json.loads(run_python(code, cache).strip().splitlines()[-1])
    assert out["after"] and set(out["after"]) == {1}
    if out["cores"] > 1:  # where BLAS would use several, it did before the call
        assert max(out["before"]) > 1


@pytest.mark.parametrize(
    "quota, expected",
    [("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), (None, None)],
)
def test_usable_cpus_are_the_affinity_capped_by_the_cgroup_quota(quota, expected, tmp_path):
    from model.devices import usable_cpus

    cores = len(os.sched_getaffinity(0))
    quota_file = tmp_path / "cpu.max"
    if quota is not None:
        quota_file.write_text(quota)
    assert usable_cpus(quota_file) == min(cores, expected or cores)


def test_only_a_session_whose_threads_fit_the_cores_spins(monkeypatch):
    """The lone image's threads spin while it runs; more threads than cores would stall on a
    descheduled spinner, so they sleep instead."""
    from model import onnx_encoder

    def spins(threads: int) -> str:
        entries = onnx_encoder.session_options(threads).get_session_config_entry
        assert entries("session.force_spinning_stop") == entries("session.intra_op.allow_spinning")
        return entries("session.intra_op.allow_spinning")

    monkeypatch.setattr(onnx_encoder, "usable_cpus", lambda: 2)
    assert [spins(threads) for threads in (1, 2, 3)] == ["0", "1", "0"]
