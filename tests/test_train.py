"""Training end to end on small data: scenes, and COCO / Karpathy fixtures a user might bring."""

import hashlib
import json

import pytest
import torch
from PIL import Image, ImageDraw

from model.cache import load_cache
from model.captioner import Captioner
from model.data.sources import VAL_SEED_BASE, dataset_examples, load_image
from model.domain import DOMAIN_FILE
from model.encoder import TUNED_TOP_FILE, EncoderTop
from model.train import TrainConfig, run
from model.vocab import fold_articles

TINY = dict(
    epochs=5,
    attention_epochs=5,
    batch_size=8,
    lr=5e-3,
    lr_baseline=5e-3,
    warmup_steps=4,
    workers=0,
    encode_batch=16,
    decoder_overrides={"hidden_dim": 64, "embed_dim": 32, "attention_dim": 32, "cell_dim": 64},
)


def test_tiny_scene_training_lowers_the_loss_and_writes_loadable_weights(tmp_path):
    config = TrainConfig(
        data="scenes",
        train_scenes=64,
        val_scenes=8,
        out_dir=str(tmp_path / "w"),
        work_dir=str(tmp_path / "run"),
        **TINY,
    )
    results = run(config, log=lambda line: None)
    for kind in ("baseline", "attention"):
        losses = [epoch["loss"] for epoch in results["decoders"][kind]["history"]]
        assert losses[-1] < losses[0] * 0.8, f"{kind} losses {losses}"
    captioner = Captioner.load(tmp_path / "w")
    assert set(captioner.decoders) == {"baseline", "attention"}
    assert (tmp_path / "run" / "train.h5").exists() and (
        tmp_path / "run" / "training.json"
    ).exists()

    # The attention decoder fine-tuned the encoder's top, and the baseline then read the tuned
    # features.
    assert results["decoders"]["attention"]["tuned_encoder_top"]
    tuned = torch.load(tmp_path / "w" / TUNED_TOP_FILE, weights_only=True)
    pretrained = EncoderTop.pretrained().state_dict()
    assert tuned.keys() == pretrained.keys()
    assert not all(torch.equal(tuned[k], pretrained[k]) for k in tuned)
    top = EncoderTop.pretrained()
    top.load_state_dict(tuned)
    frozen = load_cache(tmp_path / "run" / "train.h5").grid
    with torch.no_grad():
        expected = top.eval().regrid(frozen.float()).reshape(-1, frozen.shape[2]).mean(0)
    baseline_norm = torch.load(tmp_path / "w" / "baseline.pt", weights_only=True)["state_dict"][
        "norm.mean"
    ]
    torch.testing.assert_close(baseline_norm, expected, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(
        baseline_norm, frozen.float().reshape(-1, frozen.shape[2]).mean(0), atol=1e-2
    )


def test_validation_scenes_come_at_every_validation_render():
    train, val = dataset_examples(
        TrainConfig(train_scenes=4, val_scenes=3, val_renders=((224, 0), (96, 70)))
    )
    assert len(train) == 4
    assert [e.key for e in val] == [f"scene/{VAL_SEED_BASE + i}/224/0" for i in range(3)] + [
        f"scene/{VAL_SEED_BASE + i}/96/70" for i in range(3)
    ]
    assert val[0].captions == val[3].captions
    assert load_image(val[3].key).size == (96, 96)


def test_frozen_encoder_option_leaves_no_tuned_top(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / TUNED_TOP_FILE).write_bytes(b"stale")
    config = TrainConfig(
        data="scenes",
        decoder="attention",
        train_scenes=16,
        val_scenes=4,
        lr_encoder_top=0,
        out_dir=str(tmp_path / "w"),
        work_dir=str(tmp_path / "run"),
        **{**TINY, "attention_epochs": 1},
    )
    results = run(config, log=lambda line: None)
    assert not results["decoders"]["attention"]["tuned_encoder_top"]
    assert not (tmp_path / "w" / TUNED_TOP_FILE).exists()
    Captioner.load(tmp_path / "w")


def test_training_is_reproducible_to_the_bit(tmp_path):
    """Both decoders (and the tuned encoder top), trained twice from nothing in separate work
    directories: every file written is byte for byte the same."""
    digests = []
    for attempt in range(2):
        out = tmp_path / f"w{attempt}"
        config = TrainConfig(
            data="scenes",
            train_scenes=8,
            val_scenes=2,
            val_renders=((224, 0),),
            out_dir=str(out),
            work_dir=str(tmp_path / f"run{attempt}"),
            **{**TINY, "epochs": 1, "attention_epochs": 1},
        )
        run(config, log=lambda line: None)
        digests.append(
            {
                path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(out.iterdir())
            }
        )
    assert set(digests[0]) == {
        "attention.pt",
        "baseline.pt",
        TUNED_TOP_FILE,
        "encoder.json",
        "vocab.json",
    }
    assert digests[0] == digests[1]
    # ...and the run left torch's global settings as it found them.
    assert not torch.are_deterministic_algorithms_enabled()


def draw_photo(path, colour):
    image = Image.new("RGB", (120, 90), (200, 200, 190))
    ImageDraw.Draw(image).ellipse((30, 20, 90, 80), fill=colour)
    image.save(path, "JPEG")


COLOURS = {"red": (210, 30, 30), "blue": (30, 60, 210), "green": (30, 170, 60)}


def test_coco_layout_trains(tmp_path):
    images = tmp_path / "train2017"
    images.mkdir()
    coco = {"images": [], "annotations": []}
    for i in range(24):
        name = list(COLOURS)[i % 3]
        draw_photo(images / f"{i:012d}.jpg", COLOURS[name])
        coco["images"].append({"id": i, "file_name": f"{i:012d}.jpg", "width": 120, "height": 90})
        coco["annotations"] += [
            {"id": 100 * i + k, "image_id": i, "caption": text}
            for k, text in enumerate(
                [f"A {name} ball on a table.", f"a round {name} object", f"The {name} circle."]
            )
        ]
    (tmp_path / "captions_train2017.json").write_text(json.dumps(coco))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / DOMAIN_FILE).write_bytes(b"a scene-trained domain check, stale here")
    config = TrainConfig(
        data="coco",
        captions_json=str(tmp_path / "captions_train2017.json"),
        images_dir=str(images),
        min_word_count=1,
        out_dir=str(tmp_path / "w"),
        work_dir=str(tmp_path / "run"),
        **TINY,
    )
    results = run(config, log=lambda line: None)
    assert results["train_images"] + results["val_images"] == 24
    assert "best_val_bleu4" in results["decoders"]["attention"]
    captioner = Captioner.load(tmp_path / "w")
    assert {"red", "ball", "table"} <= set(captioner.vocab.words)
    encoded = captioner.encode([Image.open(images / "000000000000.jpg")])
    caption = captioner.greedy(encoded, "attention")[0]
    assert all(
        word in captioner.vocab.words for word in fold_articles(caption.tokens)
    )  # "an" is spelling
    # Photos declare no training domain: the stale check is gone and every picture is in domain.
    assert not (tmp_path / "w" / DOMAIN_FILE).exists() and not captioner.has_domain_check
    assert captioner.domain(encoded)[0].in_domain


def test_karpathy_split_trains(tmp_path):
    images = tmp_path / "Flicker8k_Dataset"
    images.mkdir()
    entries = []
    for i in range(20):
        name = list(COLOURS)[i % 3]
        draw_photo(images / f"{i}.jpg", COLOURS[name])
        entries.append(
            {
                "filename": f"{i}.jpg",
                "split": "val" if i >= 16 else "train",
                "sentences": [
                    {"raw": f"a {name} disc", "tokens": ["a", name, "disc"]},
                    {"raw": f"{name} circle", "tokens": [name, "circle"]},
                ],
            }
        )
    (tmp_path / "dataset_flickr8k.json").write_text(
        json.dumps({"images": entries, "dataset": "flickr8k"})
    )
    config = TrainConfig(
        data="karpathy",
        karpathy_json=str(tmp_path / "dataset_flickr8k.json"),
        images_dir=str(images),
        min_word_count=1,
        decoder="attention",
        out_dir=str(tmp_path / "w"),
        work_dir=str(tmp_path / "run"),
        **TINY,
    )
    results = run(config, log=lambda line: None)
    assert (results["train_images"], results["val_images"]) == (16, 4)
    assert Captioner.load(tmp_path / "w").decoders == ("attention",)


def test_missing_dataset_paths_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match="--captions-json"):
        run(
            TrainConfig(data="coco", out_dir=str(tmp_path), work_dir=str(tmp_path)),
            log=lambda line: None,
        )
