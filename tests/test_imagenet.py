"""ImageNet labels from the cached grid, by the encoder's original (not fine-tuned) top."""

import sys

import pytest
from PIL import Image

from model.captioner import DEFAULT_WEIGHTS_DIR, Captioner
from model.imagenet import class_names

skimage_data = pytest.importorskip("skimage.data")

CATS = {"Egyptian cat", "tiger cat", "tabby", "Persian cat", "Siamese cat", "lynx"}


def test_class_names_are_torchvision_imagenet_list():
    import torchvision

    assert (
        list(class_names())
        == torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    )


def test_labels_name_the_cat_and_the_coffee_from_the_cache_with_the_bundled_and_untrained_weights():
    pictures = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    for captioner in (Captioner.load(), Captioner.untrained()):
        encoded = captioner.encode(pictures)
        cat, coffee = captioner.imagenet_labels(encoded)
        assert len(cat) == len(coffee) == 5
        assert CATS & {label.label for label in cat}
        assert {"espresso", "cup"} & {label.label for label in coffee}
        assert cat[0].label == "Egyptian cat" and 0.6 < cat[0].p <= 1
        assert all(a.p >= b.p for a, b in zip(cat, cat[1:]))
        assert [len(labels) for labels in captioner.imagenet_labels(encoded, k=3)] == [3, 3]
    assert captioner.imagenet_labels([]) == []


def test_the_model_package_does_not_import_torchvision_for_labels():
    import subprocess

    code = (
        "import sys; from model.captioner import Captioner; c = Captioner.untrained(); "
        "from PIL import Image; c.imagenet_labels(c.encode([Image.new('RGB', (64, 64))])); "
        "print('torchvision' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "False", result.stderr


def test_the_bundles_onnx_head_gives_torchs_top_5(tmp_path, monkeypatch):
    """The serving bundle's imagenet_head.onnx (ONNX Runtime, no torch) against the torch head."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from model import bundle as serving
    from model.data.scenes import render_scene
    from model.imagenet import OnnxImageNetHead, TorchImageNetHead, block4_maps

    monkeypatch.setenv(serving.CACHE_ENV, str(tmp_path))
    captioner = Captioner.load()
    assert isinstance(
        captioner.side._imagenet or captioner.side.imagenet_factory(), OnnxImageNetHead
    )
    pictures = [
        Image.fromarray(skimage_data.chelsea()),
        Image.fromarray(skimage_data.coffee()),
        Image.fromarray(skimage_data.astronaut()),
        render_scene(30_000_000)[1],
    ]
    grids = np.stack([e.grid for e in captioner.encode(pictures)])
    onnx = OnnxImageNetHead(serving.load_bundle(DEFAULT_WEIGHTS_DIR).file("imagenet_head.onnx"))
    blocks = block4_maps(grids)
    got, expected = onnx.logits(blocks), TorchImageNetHead().logits(blocks)
    assert np.abs(got - expected).max() < 1e-3
    assert (np.argsort(-got, 1)[:, :5] == np.argsort(-expected, 1)[:, :5]).all()
