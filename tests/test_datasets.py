"""COCO and Karpathy-split adapters on tiny fixture files."""

import json

import pytest
from PIL import Image

from model.data.datasets import Record, load_coco, load_karpathy, tokenize


def _jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "JPEG")


def test_tokenize():
    assert tokenize("A man's  dog, running!") == ["a", "mans", "dog", "running"]
    assert tokenize("Black-and-white photo.\n") == ["black", "and", "white", "photo"]
    assert tokenize("TWO red circles") == ["two", "red", "circles"]
    assert tokenize("") == [] and tokenize("...") == []


def test_load_coco_groups_captions_per_image(tmp_path):
    images = tmp_path / "train2017"
    for name in ("000000000001.jpg", "000000000002.jpg", "000000000003.jpg"):
        _jpeg(images / name)
    (tmp_path / "captions_train2017.json").write_text(
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "images": [
                    {"id": 1, "file_name": "000000000001.jpg", "width": 8, "height": 8},
                    {"id": 2, "file_name": "000000000002.jpg", "width": 8, "height": 8},
                    {"id": 3, "file_name": "000000000003.jpg", "width": 8, "height": 8},
                ],
                "annotations": [
                    {"id": 10, "image_id": 2, "caption": "A dog on a couch."},
                    {"id": 11, "image_id": 1, "caption": "A red bus.\n"},
                    {"id": 12, "image_id": 2, "caption": " Two  dogs sleeping "},
                    {"id": 13, "image_id": 1, "caption": "A bus parked."},
                ],
            }
        )
    )
    records = load_coco(tmp_path / "captions_train2017.json", images, "train")
    assert records == [
        Record(str(images / "000000000001.jpg"), ["A red bus.", "A bus parked."], "train"),
        Record(
            str(images / "000000000002.jpg"), ["A dog on a couch.", "Two dogs sleeping"], "train"
        ),
    ]  # image 3 has no captions
    with Image.open(records[0].image_path) as im:
        assert im.size == (8, 8)
    with pytest.raises(ValueError):
        load_coco(tmp_path / "captions_train2017.json", images, "training")


def test_load_karpathy_splits_and_paths(tmp_path):
    _jpeg(tmp_path / "val2014" / "COCO_val2014_1.jpg")
    _jpeg(tmp_path / "train2014" / "COCO_train2014_2.jpg")
    _jpeg(tmp_path / "COCO_val2014_3.jpg")  # flat layout also accepted
    _jpeg(tmp_path / "COCO_val2014_4.jpg")
    (tmp_path / "dataset_coco.json").write_text(
        json.dumps(
            {
                "dataset": "coco",
                "images": [
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_1.jpg",
                        "split": "test",
                        "sentences": [
                            {"tokens": ["a", "cat"], "raw": "A cat."},
                            {"tokens": ["a", "kitten"], "raw": "A kitten"},
                        ],
                    },
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_2.jpg",
                        "split": "train",
                        "sentences": [{"tokens": ["a", "bike"], "raw": "A bike"}],
                    },
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_3.jpg",
                        "split": "restval",
                        "sentences": [{"tokens": ["a", "tree"]}],
                    },
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_4.jpg",
                        "split": "val",
                        "sentences": [{"tokens": ["a", "boat"], "raw": "A boat"}],
                    },
                ],
            }
        )
    )
    records = load_karpathy(tmp_path / "dataset_coco.json", tmp_path)
    assert [r.split for r in records] == ["test", "train", "train", "val"]
    assert records[0] == Record(
        str(tmp_path / "val2014" / "COCO_val2014_1.jpg"), ["A cat.", "A kitten"], "test"
    )
    assert records[2].image_path == str(tmp_path / "COCO_val2014_3.jpg")
    assert records[2].captions == ["a tree"]  # no raw text: joined tokens


def test_load_karpathy_flickr8k(tmp_path):
    _jpeg(tmp_path / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg")
    (tmp_path / "dataset_flickr8k.json").write_text(
        json.dumps(
            {
                "dataset": "flickr8k",
                "images": [
                    {
                        "filename": "1000268201_693b08cb0e.jpg",
                        "split": "train",
                        "imgid": 0,
                        "sentences": [
                            {"tokens": ["a", "child"], "raw": "A child in a pink dress ."}
                        ],
                    },
                ],
            }
        )
    )
    records = load_karpathy(tmp_path / "dataset_flickr8k.json", tmp_path / "Flicker8k_Dataset")
    assert records == [
        Record(
            str(tmp_path / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg"),
            ["A child in a pink dress ."],
            "train",
        )
    ]
    assert tokenize(records[0].captions[0]) == ["a", "child", "in", "a", "pink", "dress"]
