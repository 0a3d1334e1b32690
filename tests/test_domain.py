"""The domain check: renders of the training domain pass, photos and other non-scenes do not."""

import hashlib
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.captioner import DEFAULT_WEIGHTS_DIR, Captioner, Encoded
from model.data.scenes import render_scene
from model.data.sources import scene_key
from model.domain import (
    DOMAIN_FILE,
    REPORTED_RENDERS,
    DomainCheck,
    domain_features,
    fit,
    render_features,
    render_name,
)
from model.nonscenes import generated_nonscenes, nonscenes

FRESH_SEEDS = (
    50_000_000  # never used to fit (0..) or calibrate (40M..) the check, nor by the card (20M..)
)
RENDERS_PER_CONDITION = 200


@pytest.fixture(scope="module")
def captioner():
    return Captioner.load()


def test_a_fitted_gaussian_scores_its_own_samples_low_and_outliers_high(tmp_path):
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((40, 40)).astype(np.float32)
    samples = rng.standard_normal((2000, 40)).astype(np.float32) @ mixing + 5
    check = fit(samples, components=16)
    inside = check.score_features(rng.standard_normal((500, 40)).astype(np.float32) @ mixing + 5)
    outside = check.score_features(
        rng.standard_normal((500, 40)).astype(np.float32) @ mixing + 5 + 10 * mixing[0]
    )  # 10 sd along one axis
    assert np.median(inside) < 1.2 and (outside > np.quantile(inside, 0.99)).mean() > 0.9
    check.threshold = float(np.quantile(inside, 0.99))
    check.save(tmp_path / DOMAIN_FILE)
    check.save_npz(tmp_path / "domain.npz")
    a, b = DomainCheck.load(tmp_path / DOMAIN_FILE), DomainCheck.load_npz(tmp_path / "domain.npz")
    for loaded in (a, b):
        np.testing.assert_allclose(
            loaded.score_features(samples[:10]),
            check.score_features(samples[:10]),
            rtol=2e-3,
            atol=2e-3,
        )  # axes are stored as float16
        assert loaded.threshold == check.threshold and loaded.info == check.info
    assert np.array_equal(a.score_features(samples), b.score_features(samples))


def test_features_are_the_mean_and_spread_of_every_feature_over_the_cells():
    grids = np.random.default_rng(0).random((3, 196, 488), dtype=np.float32)
    features = domain_features(grids.astype(np.float16))
    assert features.shape == (3, 976) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, :488], grids.mean(1), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(features[:, 488:], grids.std(1, ddof=1), atol=1e-3, rtol=1e-3)


def torch_scores(check: DomainCheck, grids: torch.Tensor) -> torch.Tensor:
    """The torch scoring that the numpy one replaced, verbatim (features, then distances)."""
    grids = grids.float()
    cells = grids.shape[1]
    total, squares = grids.sum(1), grids.square().sum(1)
    mean = total / cells
    variance = (squares - total * mean).clamp_min(0) / max(cells - 1, 1)
    features = torch.cat([mean, variance.sqrt()], dim=1)
    centre, scale, axes, variances = (
        torch.from_numpy(v) for v in (check.mean, check.scale, check.axes, check.variances)
    )
    z = (features - centre) / scale
    projected = z @ axes
    leading = projected.square()
    rest = (z.square().sum(1) - leading.sum(1)).clamp_min(0)
    squared = (leading / variances).sum(1) + rest / check.rest_variance
    return (squared / centre.numel()).sqrt()


def test_numpy_scores_equal_the_old_torch_ones(captioner):
    pytest.importorskip("skimage")
    pictures = list(nonscenes().values())[:6] + [render_scene(50_000_000 + s)[1] for s in range(6)]
    grids = np.stack([e.grid for e in captioner.encode(pictures)])
    got = captioner.domain_check.scores(grids)
    expected = torch_scores(captioner.domain_check, torch.from_numpy(grids)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_weights_without_a_domain_file_call_everything_in_domain():
    captioner = Captioner.untrained()
    assert not captioner.has_domain_check
    grids = np.random.default_rng(0).random((2, 196, 488)).astype(np.float16)
    verdicts = captioner.domain([Encoded(grid) for grid in grids])
    assert [v.in_domain for v in verdicts] == [True, True]
    assert verdicts[0].score == 0.0 and math.isinf(verdicts[0].threshold)
    assert captioner.domain([]) == []


def test_the_bundled_check_rejects_at_least_95_percent_of_non_scenes(captioner):
    pytest.importorskip("skimage")
    pictures = nonscenes()
    assert len(pictures) >= 40, sorted(
        pictures
    )  # 36 offline photos (colour ones twice) + 5 generated
    assert set(generated_nonscenes()) <= set(pictures)
    verdicts = captioner.domain(captioner.encode(list(pictures.values())))
    accepted = [name for name, verdict in zip(pictures, verdicts) if verdict.in_domain]
    assert len(accepted) <= 0.05 * len(pictures), accepted
    scores = dict(zip(pictures, (v.score for v in verdicts)))
    for name in ("chelsea", "coffee", "astronaut", "page of text", "bar chart", "colour noise"):
        assert name not in scores or scores[name] > verdicts[0].threshold, (name, scores[name])


@pytest.mark.slow
@pytest.mark.parametrize("side, quality", REPORTED_RENDERS)
def test_the_bundled_check_rejects_at_most_1_percent_of_fresh_renders(captioner, side, quality):
    keys = [
        scene_key(seed, side, quality)
        for seed in range(FRESH_SEEDS, FRESH_SEEDS + RENDERS_PER_CONDITION)
    ]
    scores = captioner.domain_check.score_features(render_features(captioner, keys))
    rejected = int((scores > captioner.domain_check.threshold).sum())
    assert rejected <= 0.01 * len(keys), (
        f"{render_name(side, quality)}: {rejected} of {len(keys)} rejected"
    )


@pytest.mark.slow
def test_domain_fit_refits_only_the_domain_file_and_the_card(tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(DEFAULT_WEIGHTS_DIR, weights)
    (weights / DOMAIN_FILE).unlink()
    decoders = {
        name: hashlib.sha256((weights / name).read_bytes()).hexdigest()
        for name in ("attention.pt", "baseline.pt", "encoder_top.pt", "vocab.json")
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model",
            "domain-fit",
            "--weights",
            str(weights),
            "--fit-scenes",
            "60",
            "--calibration-scenes",
            "2",
            "--report-scenes",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    check = DomainCheck.load(weights / DOMAIN_FILE)
    assert math.isfinite(check.threshold) and check.info["fit_images"] == 60
    assert set(check.info["test_rejected"]) == {render_name(*r) for r in REPORTED_RENDERS}
    assert decoders == {
        name: hashlib.sha256((weights / name).read_bytes()).hexdigest() for name in decoders
    }
    card = (weights / "MODEL_CARD.md").read_text()
    assert card.count("## Domain check") == 1 and card.count("## Files") == 1
    assert f"| {DOMAIN_FILE} | {(weights / DOMAIN_FILE).stat().st_size} | " in card
    assert "## Scores on the held-out scenes" in card and "## What was tried" in card
