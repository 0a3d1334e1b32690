"""Where training, validation and test pictures come from: scene recipes and the photo datasets.

A picture is named by a key: a scene recipe `scene/SEED/SIDE/JPEG_QUALITY` (rendered on demand,
so that a cache can be rebuilt from its keys alone) or an image file's path.
"""

from __future__ import annotations

import io
import random
from typing import TYPE_CHECKING

from PIL import Image

from model.cache import Example
from model.images import open_image

if TYPE_CHECKING:
    from model.train import TrainConfig

TRAIN_SEED_BASE = 0  # scene seeds: training 0.., validation 10M.., held-out test 20M..
VAL_SEED_BASE = 10_000_000
TEST_SEED_BASE = 20_000_000


def scene_key(seed: int, side: int = 224, jpeg_quality: int = 0) -> str:
    return f"scene/{seed}/{side}/{jpeg_quality}"


# (share, smallest side, largest side) of the training renders.
# Small renders get the most weight: upscaled to 224 they blur, and small objects in them are the
# hardest to name. With 96..160 px at 25 % and 224 px at 30 %, the model lost 7 points of exact
# match at 96 px, nearly all of them small objects' shapes; it loses none at 1024 px, whose
# renders, squashed to 224, look much like 224 px ones.
TRAINING_SIZES = ((0.20, 224, 224), (0.35, 96, 128), (0.15, 129, 223), (0.30, 225, 1024))
TRAINING_JPEG_SHARE, TRAINING_JPEG_QUALITY = 0.5, (60, 95)


def training_variant(seed: int) -> tuple[int, int]:
    """Training scenes come at many sizes, a part JPEG-compressed, as users' files will."""
    rng = random.Random(seed * 7919 + 17)
    roll = rng.random()
    # The loop stops at the chosen row: its sides are read after the loop.
    for share, smallest, largest in TRAINING_SIZES:  # noqa: B007
        if roll < share:
            break
        roll -= share
    side = smallest if smallest == largest else rng.randint(smallest, largest)
    quality = rng.randint(*TRAINING_JPEG_QUALITY) if rng.random() < TRAINING_JPEG_SHARE else 0
    return side, quality


def load_image(key: str) -> Image.Image:
    """A picture by its key: a scene recipe `scene/SEED/SIDE/JPEG_QUALITY`, or a file path."""
    if not key.startswith("scene/"):
        return open_image(key)
    from model.data.scenes import render_scene

    _, seed, side, quality = key.split("/")
    _, image = render_scene(int(seed), int(side))
    if int(quality):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(quality))
        image = open_image(buffer.getvalue())
    return image


def scene_examples(
    first_seed: int, count: int, augment: bool = False, side: int = 224, jpeg_quality: int = 0
) -> list[Example]:
    from model.data.scenes import make_scene

    examples = []
    for seed in range(first_seed, first_seed + count):
        s, q = training_variant(seed) if augment else (side, jpeg_quality)
        examples.append(Example(scene_key(seed, s, q), make_scene(seed).captions))
    return examples


def dataset_examples(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    if config.data == "scenes":
        return (
            scene_examples(TRAIN_SEED_BASE, config.train_scenes, augment=True),
            [
                e
                for side, quality in config.val_renders
                for e in scene_examples(
                    VAL_SEED_BASE, config.val_scenes, side=side, jpeg_quality=quality
                )
            ],
        )
    from model.data import datasets

    if config.data == "coco":
        if not (config.captions_json and config.images_dir):
            raise SystemExit(
                "--data coco needs --captions-json and --images-dir (and "
                "--val-captions-json/--val-images-dir)"
            )
        records = datasets.load_coco(config.captions_json, config.images_dir, "train")
        if config.val_captions_json:
            records += datasets.load_coco(
                config.val_captions_json, config.val_images_dir or config.images_dir, "val"
            )
    elif config.data == "karpathy":
        if not (config.karpathy_json and config.images_dir):
            raise SystemExit("--data karpathy needs --karpathy-json and --images-dir")
        records = datasets.load_karpathy(config.karpathy_json, config.images_dir)
    else:
        raise SystemExit(f"unknown --data {config.data!r}: choose scenes, coco or karpathy")
    train = [Example(r.image_path, r.captions) for r in records if r.split == "train"]
    val = [Example(r.image_path, r.captions) for r in records if r.split == "val"][
        : config.max_val_images
    ]
    if not val:  # no validation split given: hold out a slice of training
        cut = max(1, min(config.max_val_images, len(train) // 20))
        train, val = train[cut:], train[:cut]
    return train, val
