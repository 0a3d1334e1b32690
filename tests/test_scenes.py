"""The renderer obeys every rule of shared/scenes-spec.md."""

import json
import re
from collections import Counter
from functools import cache

import numpy as np
import pytest

from model.data import scenes
from model.data.scenes import (
    COLOURS,
    SHAPES,
    SIZE_RANGE,
    SIZES,
    Scene,
    SceneObject,
    group_objects,
    make_scene,
    render,
    render_scene,
)

SEEDS = range(400)
RENDER_SEEDS = range(120)


@cache
def scene(seed):
    return make_scene(seed)


@cache
def pixels(seed, side=224):
    return np.asarray(render(scene(seed), side)).astype(int)


def test_public_constants():
    assert SHAPES == ("circle", "square", "triangle", "star", "hexagon", "cross")
    assert SIZES == ("small", "large")
    assert COLOURS["red"] == (220, 40, 40) and COLOURS["purple"] == (140, 60, 180)
    assert set(COLOURS) == {"red", "green", "blue", "yellow", "orange", "purple"}


def test_deterministic_by_seed():
    for seed in (0, 7, 12345):
        assert make_scene(seed) == make_scene(seed)
        a, b = render_scene(seed)[1], render_scene(seed)[1]
        assert a.tobytes() == b.tobytes()
    assert make_scene(1) != make_scene(2)
    assert render_scene(1)[1].tobytes() != render_scene(2)[1].tobytes()


def test_layout_rules():
    counts = Counter()
    for seed in SEEDS:
        objs = scene(seed).objects
        counts[len(objs)] += 1
        for o in objs:
            assert o.shape in SHAPES and o.colour in COLOURS and o.size in SIZES
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, "box must lie inside the image"
            lo, hi = SIZE_RANGE[o.size]
            assert lo - 1e-9 <= max(x1 - x0, y1 - y0) <= hi + 1e-9
            if o.shape == "circle":
                assert o.rotation == 0 and abs((x1 - x0) - (y1 - y0)) < 1e-9
            assert all(abs(c - a) <= 20 for c, a in zip(o.fill, COLOURS[o.colour]))
            assert 0 <= o.outline <= 3
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert scenes.boxes_apart(a.box, b.box, 0.04 - 1e-9), (seed, a.box, b.box)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 50


def test_variety_covers_the_domain():
    objs = [o for seed in SEEDS for o in scene(seed).objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == set(SIZES)
    assert len({round(o.rotation) for o in objs if o.shape != "circle"}) > 100
    group_counts = Counter(g.count for seed in SEEDS for g in group_objects(scene(seed).objects))
    assert group_counts[2] > 20 and group_counts[3] > 0


def _bg_hsv(bg):
    rgb = bg.reshape(-1, 3) / 255
    mx, mn = rgb.max(1), rgb.min(1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0)
    return sat, mx


def test_backgrounds_low_saturation_and_all_styles():
    styles = Counter()
    for seed in range(150):
        style = scenes.background_style(seed)
        styles[style] += 1
        bg = scenes._background(seed, 224).astype(np.float64)
        sat, val = _bg_hsv(bg)
        assert sat.max() <= 0.25 + 1e-3, seed
        if style == "noise":  # per-pixel jitter, sigma <= 25 per channel
            assert 1 < bg.std(axis=(0, 1)).max() <= 25.5
            assert np.abs(np.diff(bg[:, :, 0], axis=1)).mean() > 2
        else:
            assert val.min() >= 0.25 - 1e-3 and val.max() <= 0.9 + 1e-3
            if style == "plain":
                assert bg.std(axis=(0, 1)).max() < 0.1
            else:
                assert bg.std(axis=(0, 1)).max() > 2
    assert set(styles) == set(scenes.BACKGROUND_STYLES) and min(styles.values()) > 10


def test_rendered_pixels_match_layout():
    for seed in RENDER_SEEDS:
        sc, img = scene(seed), pixels(seed)
        assert img.shape == (224, 224, 3)
        bg = np.clip(scenes._background(seed, 224) + 0.5, 0, 255).astype(int)
        changed = np.abs(img - bg).max(axis=2) > 10
        inside_any = np.zeros_like(changed)
        for o in sc.objects:
            x0, y0, x1, y1 = (int(round(v * 224)) for v in o.box)
            # the fill colour sits at the box centre (inside every shape, even rotated)
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            assert np.abs(img[cy, cx] - np.array(o.fill)).max() <= 3, (seed, o)
            inside_any[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = True
            # the drawn shape reaches the edges of its tight box
            ys, xs = np.nonzero(changed[y0:y1, x0:x1])
            assert xs.max() - xs.min() >= (x1 - x0) - 4 and ys.max() - ys.min() >= (y1 - y0) - 4
        assert not (changed & ~inside_any).any(), f"paint outside boxes in scene {seed}"


@pytest.mark.parametrize("side", [96, 1024])
def test_render_any_side(side):
    for seed in (3, 5, 8):
        sc, img = render_scene(seed, side)
        assert img.size == (side, side) and img.mode == "RGB"
        a = np.asarray(img).astype(int)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            cx, cy = int((x0 + x1) / 2 * side), int((y0 + y1) / 2 * side)
            assert np.abs(a[cy, cx] - np.array(o.fill)).max() <= 4
        assert render(sc, side).tobytes() == img.tobytes()


CAPTION_RE = re.compile(r"^[a-z]+( [a-z]+)*$")
NUMBERS = {1: "a", 2: "two", 3: "three"}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
ALL_SIZE_WORDS = "small|little|large|big"


def _shape_word(shape, count):
    return shape if count == 1 else scenes.plural(shape)


def test_caption_grammar_and_every_group_named():
    for seed in SEEDS:
        sc = scene(seed)
        assert len(sc.captions) == 5
        assert len(set(sc.captions)) == 5, sc.captions
        assert len(set(sc.templates)) == 5
        groups = group_objects(sc.objects)
        for cap in sc.captions:
            assert CAPTION_RE.match(cap), cap
            assert len(cap.split()) <= 16, cap
            named = re.findall(rf"\b(a|two|three) (?:({ALL_SIZE_WORDS}) )?([a-z]+) ([a-z]+)\b", cap)
            assert len(named) == len(groups), (cap, named)
            for g in groups:
                hits = [
                    n for n in named if n[2] == g.colour and n[3] == _shape_word(g.shape, g.count)
                ]
                assert len(hits) == 1, (cap, g.colour, g.shape)
                number, size_word = hits[0][0], hits[0][1]
                assert number == NUMBERS[g.count]
                if size_word:  # sizes only when every member has that size
                    assert g.size is not None and size_word in SIZE_WORDS[g.size], cap


def test_counts_merge_into_groups():
    merged = 0
    for seed in SEEDS:
        sc = scene(seed)
        for g in group_objects(sc.objects):
            if g.count > 1:
                merged += 1
                word = {2: "two", 3: "three"}[g.count]
                plural = "crosses" if g.shape == "cross" else g.shape + "s"
                assert all(f"{word} " in c and plural in c for c in sc.captions)
    assert merged > 20
    assert scenes.plural("cross") == "crosses" and scenes.plural("star") == "stars"


def test_spatial_relations_in_references_are_true():
    stated = 0
    for seed in SEEDS:
        sc = scene(seed)
        groups = {(g.colour, g.shape): g for g in group_objects(sc.objects)}
        for cap in sc.captions:
            for rel in scenes.RELATIONS:
                m = re.search(
                    rf"(\w+) (\w+) {rel} (?:a|two|three) (?:(?:{ALL_SIZE_WORDS}) )?"
                    rf"(\w+) (\w+)",
                    cap,
                )
                if not m:
                    continue
                stated += 1
                a, b = (
                    groups[(c, s if s in SHAPES else _singular(s))]
                    for c, s in ((m[1], m[2]), (m[3], m[4]))
                )
                assert scenes.relation(a.centre, b.centre) == rel, (seed, cap)
    assert stated > 150


def _singular(word):
    return word[:-2] if word.endswith("sses") else word[:-1]


def test_hand_built_scene_renders_and_relation():
    left = SceneObject("circle", "red", "large", (0.05, 0.3, 0.5, 0.75), 0.0)
    right = SceneObject("square", "blue", "small", (0.7, 0.4, 0.9, 0.6), 30.0)
    sc = Scene([left, right], ["a red circle to the left of a blue square"] * 5, seed=9)
    img = np.asarray(render(sc, 128)).astype(int)
    assert np.abs(img[67, 35] - np.array(COLOURS["red"])).max() <= 2  # anchor used when no fill
    assert scenes.relation(left.centre, right.centre) == "to the left of"
    assert scenes.relation(right.centre, left.centre) == "to the right of"
    assert scenes.relation((0.5, 0.1), (0.5, 0.8)) == "above"
    assert scenes.relation((0.5, 0.8), (0.4, 0.1)) == "below"


def test_cli_writes_pngs_and_captions(tmp_path):
    scenes.main(["--out", str(tmp_path), "--count", "3", "--seed", "10", "--side", "96"])
    index = json.loads((tmp_path / "captions.json").read_text())
    assert len(index) == 3 and len(list(tmp_path.glob("*.png"))) == 3
    entry = index["scene_000010.png"]
    assert entry["captions"] == make_scene(10).captions
