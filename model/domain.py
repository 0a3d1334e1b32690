"""Is this picture like the ones the decoders were trained on? A distance from the training domain.

The bundled decoders know only rendered shape scenes; on a photograph they write confident
fiction. This check scores how far an image's encoding lies from the training renders' and
compares the score with a threshold, so the caller can say so instead.

- Features (`domain_features`): from the cached grid alone, no picture needed — the mean cell
  (472 CNN features + 16 colour statistics) and the spread of every feature over the 196 cells.
- Score: the Mahalanobis distance from the training renders' mean under their covariance,
  shrunk towards a scaled identity (Ledoit-Wolf) and kept to its leading principal axes plus one
  term for the rest, so the file stays small and a check costs a matrix-vector product.
- Fitted on training-domain encodings only (no photos needed); the threshold is calibrated on
  held-out renders at the training sizes and JPEG qualities so that at most `MAX_REJECTED` of
  each is rejected (`python -m model domain-fit`; `make weights` runs it too).

A weights directory without `domain.pt` (COCO or Karpathy-trained weights) declares no domain:
the captioner then calls everything in domain.

What separated best (DOMAIN_TRIALS, also in the model card) was measured on 3,000 training
renders, 10 render conditions x 300 held-out scenes and the 41 offline non-scenes of
model/nonscenes.py, each method's threshold at the highest 99.5th percentile of the conditions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.casts import to_float

if TYPE_CHECKING:
    import torch

DOMAIN_FILE = "domain.pt"
MAX_REJECTED = 0.01  # of in-domain renders, per size and JPEG quality
COMPONENTS = 256  # principal axes kept; the rest share one variance


DOMAIN_TRIALS = [
    "- k-nearest-neighbour distance (k = 5, standardised features, all 3,000 training renders "
    "kept):",
    "  19 of 41 non-scenes rejected on the mean cell, 30 with the spread, 33 with per-feature "
    "maxima too.",
    "- Mahalanobis on the mean cell alone: 39 of 41 (a pie chart and grey noise let through); with "
    "the",
    "  spread over the cells (these weights): 40 of 41, only grey noise let through; with "
    "per-feature",
    "  maxima as well: the same 40, the median non-scene nearer the threshold (1.43 times it, "
    "against",
    "  1.51). 128, 256 or 512 principal axes: the same 40.",
    "- The colour statistics alone are far from Gaussian: a model of them let 28 of 41 non-scenes",
    "  through; one of the cells' colour maxima beside the mean-and-spread model (each picture's",
    "  larger score) rejected all 41, but also 2 % of one condition's scenes.",
    "- Fitting on 750 or 1,500 renders instead of 3,000: the non-scenes' median score fell from "
    "1.51",
    "  times the threshold to 1.41 or 1.49.",
]


@dataclass(frozen=True)
class DomainVerdict:
    in_domain: bool
    score: float  # larger = farther from the training domain
    threshold: float  # in_domain is score <= threshold


def domain_features(grids: np.ndarray) -> np.ndarray:
    """(B, cells, D) grids -> (B, 2D) float32: every feature's mean and spread over the cells."""
    grids = to_float(grids)  # float16 as encoded: numpy's cast took 2.6 of 3.9 ms for 16 grids
    cells = grids.shape[1]
    # From sums (one pass each, as the torch version this replaced: its mean and std over a middle
    # dimension took 20 times as long).
    total, squares = grids.sum(1), np.square(grids).sum(1)
    mean = total / np.float32(cells)
    variance = np.maximum(squares - total * mean, 0) / np.float32(max(cells - 1, 1))
    return np.concatenate([mean, np.sqrt(variance)], axis=1)


@dataclass
class DomainCheck:
    """The fitted check, as numpy arrays: scoring needs no torch (the serving bundle keeps it as
    domain.npz, model/bundle.py); only fitting and reading domain.pt import torch."""

    mean: np.ndarray  # (F,) of the training features
    scale: np.ndarray  # (F,) their standard deviations: scores read standardised features
    axes: np.ndarray  # (F, K) orthonormal leading principal axes of the standardised features
    variances: np.ndarray  # (K,) their shrunk variances
    rest_variance: float  # the shrunk variance of every other direction
    threshold: float = math.inf
    info: dict = field(default_factory=dict)  # how it was fitted and calibrated, measured rates

    # -- scoring -------------------------------------------------------------------------------
    def scores(self, grids: np.ndarray) -> np.ndarray:
        """(B, cells, D) grids -> (B,) distances from the training domain."""
        return self.score_features(domain_features(grids))

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(B, F) domain features -> (B,) Mahalanobis distances per feature, sqrt(d^2 / F)."""
        z = (np.asarray(features, dtype=np.float32) - self.mean) / self.scale
        projected = z @ self.axes  # (B, K)
        leading = np.square(projected)
        rest = np.maximum(np.square(z).sum(1) - leading.sum(1), 0)  # off the leading axes
        squared = (leading / self.variances).sum(1) + rest / np.float32(self.rest_variance)
        return np.sqrt(squared / np.float32(self.mean.size))

    def verdicts(self, grids: np.ndarray) -> list[DomainVerdict]:
        return [
            DomainVerdict(bool(s <= self.threshold), float(s), float(self.threshold))
            for s in self.scores(grids).tolist()
        ]

    # -- files -----------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "axes": self.axes.astype(np.float16),  # half the file; scores move by about 1e-3
            "variances": self.variances.astype(np.float32),
        }

    @classmethod
    def _from_arrays(cls, arrays, rest_variance, threshold, info) -> DomainCheck:
        mean, scale, axes, variances = (
            np.asarray(arrays[k], dtype=np.float32) for k in ("mean", "scale", "axes", "variances")
        )
        return cls(
            mean,
            scale,
            axes,
            variances,
            float(rest_variance),
            float(threshold),
            dict(info),
        )

    def save(self, path: str | Path) -> None:
        """domain.pt, the weights directory's file (a torch pickle of tensors)."""
        import torch

        saved: dict = {k: torch.from_numpy(v) for k, v in self._arrays().items()}
        saved.update(rest_variance=self.rest_variance, threshold=self.threshold, info=self.info)
        torch.save(saved, path)

    @classmethod
    def load(cls, path: str | Path) -> DomainCheck:
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True)
        arrays = {k: saved[k].float().numpy() for k in ("mean", "scale", "axes", "variances")}
        return cls._from_arrays(
            arrays, saved["rest_variance"], saved["threshold"], saved.get("info", {})
        )

    def save_npz(self, path: str | Path) -> None:
        """The same check as numpy arrays (the serving bundle's domain.npz): loads without torch."""
        header: dict = {"rest_variance": self.rest_variance, "threshold": self.threshold}
        header["info"] = self.info
        arrays: dict[str, Any] = {"header": np.array(json.dumps(header)), **self._arrays()}
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load_npz(cls, path: str | Path) -> DomainCheck:
        with np.load(path, allow_pickle=False) as saved:
            header = json.loads(str(saved["header"]))
            return cls._from_arrays(
                saved, header["rest_variance"], header["threshold"], header["info"]
            )


def fit(features: np.ndarray | torch.Tensor, components: int = COMPONENTS) -> DomainCheck:
    """A Ledoit-Wolf-shrunk Gaussian of standardised training-domain features (N, F); threshold
    unset."""
    import torch

    x = torch.as_tensor(np.asarray(features)).double()
    n, dim = x.shape
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-4)
    z = (x - mean) / scale
    covariance = z.T @ z / n
    identity = torch.eye(dim, dtype=x.dtype)
    mu = covariance.diagonal().mean()
    # Ledoit-Wolf: the weight on mu * I that minimises the expected squared error. Its
    # sampling-error term sum_i ||z_i z_i^T - S||^2 equals sum_i ||z_i||^4 - n ||S||^2, as the mean
    # of z_i z_i^T is S.
    delta = (covariance - mu * identity).square().sum()
    beta = ((z.square().sum(1).square().sum() - n * covariance.square().sum()) / (n * n)).clamp(
        min=0
    )
    shrink = float((beta / delta).clamp(0, 1))
    eigenvalues, eigenvectors = torch.linalg.eigh(
        (1 - shrink) * covariance + shrink * mu * identity
    )
    order = eigenvalues.argsort(descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    k = min(components, dim - 1)
    return DomainCheck(
        mean.float().numpy(),
        scale.float().numpy(),
        eigenvectors[:, :k].float().numpy(),
        eigenvalues[:k].float().numpy(),
        float(eigenvalues[k:].mean()),
        info={
            "method": "mahalanobis",
            "fit_images": n,
            "features": dim,
            "components": k,
            "shrinkage": round(shrink, 4),
        },
    )


# ----------------------------------------------------------------------------------------------
# Fitting and calibrating on rendered scenes: python -m model domain-fit (and make weights)

# Held-out renders for the threshold: every training size band at its ends and middle, PNG and
# JPEG at the lowest, a middle and the highest training quality. Seeds from 40,000,000 (training
# 0.., validation 10M.., test 20M..); the tests draw fresh renders from 50,000,000.
CALIBRATION_SEED_BASE = 40_000_000
CALIBRATION_RENDERS = tuple(
    (side, quality) for side in (96, 128, 160, 224, 512, 1024) for quality in (0, 60, 70, 95)
)
# The conditions the model card and the tests report: the held-out sets of model/evaluate.py.
REPORTED_RENDERS = ((224, 0), (224, 70), (96, 0), (96, 70), (1024, 0), (1024, 70))


def render_name(side: int, quality: int) -> str:
    return f"{side}px " + (f"JPEG q{quality}" if quality else "PNG")


def encode_features(captioner, images: Sequence, batch: int = 32) -> np.ndarray:
    """Pictures -> their domain features, through the captioner's encoder (as at inference)."""
    chunks = []
    for start in range(0, len(images), batch):
        encoded = captioner.encode(images[start : start + batch])
        chunks.append(domain_features(np.stack([np.asarray(e.grid) for e in encoded])))
    return np.concatenate(chunks) if chunks else np.empty((0, 0), np.float32)


def render_features(captioner, keys: Sequence[str], batch: int = 32) -> np.ndarray:
    """Scene recipes (model.data.sources.scene_key) -> domain features, rendering a batch at a
    time."""
    from model.data.sources import load_image

    return np.concatenate(
        [
            encode_features(captioner, [load_image(k) for k in keys[start : start + batch]], batch)
            for start in range(0, len(keys), batch)
        ]
    )


def rejected_share(check: DomainCheck, features: np.ndarray) -> float:
    return float((check.score_features(features) > check.threshold).mean())


def calibrate(
    check: DomainCheck, held_out: dict[str, np.ndarray], max_rejected: float = MAX_REJECTED
) -> float:
    """The threshold: the largest, over the render conditions, of the score that rejects
    max_rejected / 2 of that condition's held-out renders (half the allowed share: a margin for
    renders the calibration never saw)."""
    return max(
        float(np.quantile(check.score_features(features), 1 - max_rejected / 2))
        for features in held_out.values()
    )


def fit_domain(
    captioner,
    fit_scenes: int = 3000,
    calibration_scenes: int = 100,
    report_scenes: int = 300,
    log: Callable[[str], None] = print,
) -> DomainCheck:
    """Fit on training renders, calibrate on held-out renders, measure on the model card's held-out
    scenes and on non-scenes; the result's info holds every measured rate."""
    from model.data.sources import TEST_SEED_BASE, TRAIN_SEED_BASE, scene_key, training_variant
    from model.nonscenes import nonscenes

    started = time.time()
    seeds = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + fit_scenes)
    check = fit(render_features(captioner, [scene_key(s, *training_variant(s)) for s in seeds]))
    log(f"domain check: fitted on {fit_scenes} training renders ({time.time() - started:.0f}s)")
    seeds = range(CALIBRATION_SEED_BASE, CALIBRATION_SEED_BASE + calibration_scenes)
    held_out = {
        render_name(side, quality): render_features(
            captioner, [scene_key(s, side, quality) for s in seeds]
        )
        for side, quality in CALIBRATION_RENDERS
    }
    check.threshold = calibrate(check, held_out)
    log(
        f"domain check: threshold {check.threshold:.3f} from {len(held_out)} x "
        f"{calibration_scenes} held-out renders"
    )
    seeds = range(TEST_SEED_BASE, TEST_SEED_BASE + report_scenes)
    rejected = {
        render_name(side, quality): round(
            rejected_share(
                check, render_features(captioner, [scene_key(s, side, quality) for s in seeds])
            ),
            4,
        )
        for side, quality in REPORTED_RENDERS
    }
    others = nonscenes()
    verdicts = (
        check.score_features(encode_features(captioner, list(others.values()))) > check.threshold
    )
    check.info.update(
        {
            "threshold_quantile": 1 - MAX_REJECTED / 2,
            "calibration_scenes": calibration_scenes,
            "calibration_renders": [render_name(*r) for r in CALIBRATION_RENDERS],
            "test_scenes": report_scenes,
            "test_rejected": rejected,
            "nonscenes": len(others),
            "nonscenes_rejected": round(float(verdicts.mean()), 4) if others else None,
            "nonscenes_accepted": [name for name, out in zip(others, verdicts.tolist()) if not out],
            "seconds": round(time.time() - started, 1),
        }
    )
    log(
        f"domain check: rejected {rejected} of held-out scenes; {int(verdicts.sum())} of "
        f"{len(others)} non-scenes"
    )
    return check
