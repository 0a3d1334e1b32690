"""Adapters for real captioning datasets a user brings (COCO, Karpathy splits of
COCO / Flickr8k / Flickr30k). Everything becomes a list of `Record`s; captions
stay as raw text and are turned into words by `tokenize`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    image_path: str
    captions: list[str]
    split: str  # "train" | "val" | "test"


def tokenize(text: str) -> list[str]:
    """Lowercase words: apostrophes vanish ("man's" -> "mans"), other punctuation
    separates words ("black-and-white" -> "black and white")."""
    text = str(text).lower().replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def _clean(caption: str) -> str:
    return " ".join(str(caption).split())


def load_coco(captions_json, images_dir, split: str) -> list[Record]:
    """COCO `captions_*.json`: "images" [{id, file_name}], "annotations" [{image_id,
    caption}]. Captions are grouped per image; images without captions are dropped."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data = json.loads(Path(captions_json).read_text())
    captions = defaultdict(list)
    for ann in data.get("annotations", []):
        if str(ann.get("caption", "")).strip():
            captions[ann["image_id"]].append(_clean(ann["caption"]))
    images_dir = Path(images_dir)
    return [
        Record(str(images_dir / img["file_name"]), captions[img["id"]], split)
        for img in data.get("images", [])
        if captions.get(img["id"])
    ]


def load_karpathy(dataset_json, images_dir) -> list[Record]:
    """Karpathy's `dataset_coco.json` / `dataset_flickr8k.json`: "images" [{filepath?,
    filename, split, sentences [{tokens, raw}]}]. "restval" counts as train."""
    data = json.loads(Path(dataset_json).read_text())
    images_dir = Path(images_dir)
    records = []
    for img in data.get("images", []):
        split = {"restval": "train"}.get(img.get("split", "train"), img.get("split", "train"))
        if split not in SPLITS:
            continue
        caps = [
            _clean(s.get("raw") or " ".join(s.get("tokens", []))) for s in img.get("sentences", [])
        ]
        caps = [c for c in caps if c]
        if not caps:
            continue
        # COCO entries live in a sub-folder (train2014/ or val2014/); accept a flat folder too
        path = images_dir / img.get("filepath", "") / img["filename"]
        if not path.exists() and (images_dir / img["filename"]).exists():
            path = images_dir / img["filename"]
        records.append(Record(str(path), caps, split))
    return records
