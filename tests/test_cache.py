"""The HDF5 feature cache: round trip, resume, rebuild on change."""

import h5py
import pytest
import torch
from PIL import Image

from model.cache import Example, build_cache, load_cache
from model.encoder import Encoder


class CountingEncoder(torch.nn.Module):
    """The real encoder, counting the images it is asked to encode."""

    def __init__(self, encoder):
        super().__init__()
        self.inner, self.seen = encoder, 0
        self.config, self.num_cells, self.feature_dim = (
            encoder.config,
            encoder.num_cells,
            encoder.feature_dim,
        )

    def forward(self, images):
        self.seen += images.shape[0]
        return self.inner(images)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (90, 90, 90)]


def load_colour(key: str) -> Image.Image:
    return Image.new("RGB", (64, 64), COLOURS[int(key)])


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def examples():
    return [Example(str(i), [f"caption {i} one", f"caption {i} two"]) for i in range(5)]


def test_round_trip_matches_direct_encoding(tmp_path, encoder):
    path = build_cache(tmp_path / "c.h5", examples(), encoder, load_colour, batch_size=2, workers=0)
    split = load_cache(path)
    assert split.grid.dtype == torch.float16 and split.grid.shape == (
        5,
        encoder.num_cells,
        encoder.feature_dim,
    )
    assert split.keys == [str(i) for i in range(5)]
    assert split.captions[3] == ["caption 3 one", "caption 3 two"]
    from model.encoder import preprocess

    with torch.inference_mode():
        direct = encoder(preprocess(load_colour("2")).unsqueeze(0))[0]
    torch.testing.assert_close(split.grid[2].float(), direct, rtol=2e-3, atol=2e-3)
    with h5py.File(path) as f:
        torch.testing.assert_close(
            torch.from_numpy(f["pooled"][2]).float(), direct.mean(0), rtol=2e-3, atol=2e-3
        )
        assert f["grid"].chunks[0] <= 64


def test_interrupted_build_resumes_only_missing_rows(tmp_path, encoder):
    path = build_cache(tmp_path / "c.h5", examples(), encoder, load_colour, batch_size=2, workers=0)
    with h5py.File(path, "r+") as f:
        f["done"][1] = f["done"][4] = False  # as if the run had died before these
        f["grid"][1] = 0
    counting = CountingEncoder(encoder)
    build_cache(path, examples(), counting, load_colour, batch_size=2, workers=0)
    assert counting.seen == 2
    assert load_cache(path).grid[1].abs().sum() > 0


def test_incomplete_cache_refuses_to_load(tmp_path, encoder):
    path = build_cache(tmp_path / "c.h5", examples(), encoder, load_colour, batch_size=5, workers=0)
    with h5py.File(path, "r+") as f:
        f["done"][0] = False
    with pytest.raises(RuntimeError, match="incomplete"):
        load_cache(path)


def test_changed_captions_rebuild_the_cache(tmp_path, encoder):
    path = build_cache(tmp_path / "c.h5", examples(), encoder, load_colour, batch_size=5, workers=0)
    changed = examples()
    changed[0] = Example("0", ["a different caption"])
    counting = CountingEncoder(encoder)
    build_cache(path, changed, counting, load_colour, batch_size=5, workers=0)
    assert counting.seen == 5 and load_cache(path).captions[0] == ["a different caption"]


def test_other_encoder_weights_under_the_same_config_rebuild_the_cache(tmp_path):
    path = build_cache(
        tmp_path / "c.h5", examples(), Encoder(), load_colour, batch_size=5, workers=0
    )
    before = load_cache(path).grid.clone()
    changed = Encoder()  # the same config, and (say) another download of the ImageNet weights
    with torch.no_grad():
        next(p for p in changed.parameters() if p.dim() == 4).mul_(1.5)
    counting = CountingEncoder(changed)
    build_cache(path, examples(), counting, load_colour, batch_size=5, workers=0)
    assert counting.seen == 5
    assert not torch.equal(load_cache(path).grid, before)
    # The same weights again: nothing to encode.
    counting = CountingEncoder(changed)
    build_cache(path, examples(), counting, load_colour, batch_size=5, workers=0)
    assert counting.seen == 0
