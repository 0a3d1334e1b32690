"""Encoder outputs cached in HDF5, so decoders train for many epochs without re-running the CNN.

File layout (one file per split):
    grid     (N, cells, D) float16, chunked by CHUNK rows, gzip-free for speed
    pooled   (N, D)        float16 (the mean cell: the image's single vector)
    done     (N,)          bool    rows already encoded: an interrupted build resumes from here
    keys     (N,)          str     where each image came from (a path, or a scene recipe)
    captions (N,)          str     the image's reference captions, joined by newlines
    attrs["encoder"]       the encoder config as JSON: a cache built by another encoder is rebuilt
    attrs["encoder_weights"] sha256 of the encoder's weights: so is one built by other weights
                             (another ImageNet download, a changed layer) under the same config
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.encoder import Encoder, preprocess

CHUNK = 64


@dataclass
class Example:
    key: str  # a file path, or a recipe the loader understands (e.g. "scene/7/224/0")
    captions: list[str]


class _Pictures(Dataset):
    def __init__(
        self, examples: Sequence[Example], rows: Sequence[int], load_image: Callable, encoder_config
    ):
        self.examples, self.rows, self.load_image, self.config = (
            examples,
            rows,
            load_image,
            encoder_config,
        )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return row, preprocess(self.load_image(self.examples[row].key), self.config)


def build_cache(
    path: str | Path,
    examples: Sequence[Example],
    encoder: Encoder,
    load_image: Callable,
    batch_size: int = 32,
    workers: int = 1,
    device: str | torch.device = "cpu",
    desc: str = "encoding",
) -> Path:
    """Encode every example's image into `path`, resuming a partial file built the same way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [e.key for e in examples]
    captions = ["\n".join(e.captions) for e in examples]
    encoder_json = json.dumps(encoder.config.to_dict(), sort_keys=True)
    weights = weights_digest(encoder)
    if path.exists() and not _matches(path, keys, captions, encoder_json, weights):
        path.unlink()  # other images, other captions or another encoder: start again
    if not path.exists():
        with h5py.File(path, "w") as f:
            n, cells, dim = len(examples), encoder.num_cells, encoder.feature_dim
            f.create_dataset(
                "grid", (n, cells, dim), dtype="float16", chunks=(min(CHUNK, n), cells, dim)
            )
            f.create_dataset("pooled", (n, dim), dtype="float16")
            f.create_dataset("done", (n,), dtype=bool)
            strings = h5py.string_dtype()
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=strings)
            f.create_dataset("captions", data=np.array(captions, dtype=object), dtype=strings)
            f.attrs["encoder"] = encoder_json
            f.attrs["encoder_weights"] = weights

    with h5py.File(path, "r+") as f:
        todo = np.flatnonzero(~f["done"][:]).tolist()
        if not todo:
            return path
        loader = DataLoader(
            _Pictures(examples, todo, load_image, encoder.config),
            batch_size=batch_size,
            num_workers=workers,
            persistent_workers=False,
        )
        encoder = encoder.to(device)
        with (
            torch.inference_mode(),
            tqdm(
                total=len(examples),
                initial=len(examples) - len(todo),
                desc=desc,
                unit="img",
                leave=False,
            ) as bar,
        ):
            for rows, images in loader:
                grid = encoder(images.to(device)).cpu()
                rows = rows.numpy()
                # h5py writes a contiguous slice fastest; rows of a batch are consecutive but for
                # resumes.
                for start, stop, offset in _runs(rows):
                    f["grid"][start:stop] = grid[offset : offset + stop - start].half().numpy()
                    f["pooled"][start:stop] = (
                        grid[offset : offset + stop - start].mean(1).half().numpy()
                    )
                    f["done"][start:stop] = True
                bar.update(len(rows))
    return path


def _strings(dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in dataset[:]]


def weights_digest(encoder: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of `encoder`, in order (values, not names)."""
    digest = hashlib.sha256()
    for tensor in encoder.state_dict().values():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _matches(
    path: Path, keys: list[str], captions: list[str], encoder_json: str, weights: str
) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return (
                f.attrs.get("encoder") == encoder_json
                and f.attrs.get("encoder_weights") == weights
                and _strings(f["keys"]) == keys
                and _strings(f["captions"]) == captions
            )
    except (OSError, KeyError):
        return False


def _runs(rows: np.ndarray):
    """Split sorted row numbers into consecutive runs: (start, stop, offset into the batch)."""
    begin = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            yield int(rows[begin]), int(rows[i - 1]) + 1, begin
            begin = i


@dataclass
class CachedSplit:
    grid: torch.Tensor  # (N, cells, D) float16
    keys: list[str]
    captions: list[list[str]]


def load_cache(path: str | Path) -> CachedSplit:
    with h5py.File(path, "r") as f:
        if not f["done"][:].all():
            raise RuntimeError(f"{path} is incomplete: build it again to resume")
        grid = torch.from_numpy(f["grid"][:])
        keys = _strings(f["keys"])
        captions = [c.split("\n") for c in _strings(f["captions"])]
    return CachedSplit(grid, keys, captions)
