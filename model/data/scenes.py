"""The "shapes" scene domain: layout, reference captions and rendering.

Follows /work/shared/scenes-spec.md. A scene is 1..3 coloured shapes on a
low-saturation background; its five reference captions name every group of
same-coloured same-shaped objects and sometimes one spatial relation.

Layout and captions come from `make_scene(seed)` (no pixels); `render(scene,
side)` draws it at any side. Boxes are fractions of the side, so the same
scene renders identically (up to resolution) at 96 px or 1024 px.

    python -m model.data.scenes --out /tmp/scenes --count 16 --seed 0
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
}
SIZES = ("small", "large")
SIZE_RANGE = {"small": (0.15, 0.28), "large": (0.38, 0.55)}  # box side / image side
SIZE_SYNONYM = {"small": "little", "large": "big"}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
MIN_GAP = 0.04  # boxes at least this far apart (fraction of side)
EDGE_MARGIN = 0.01  # keep boxes a hair inside the image so anti-aliasing is not clipped
COLOUR_JITTER = 20
MAX_WORDS = 16
REFERENCE_SIDE = 224  # outline widths are given in pixels at this side


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the side
    rotation: float = 0.0  # degrees, counter-clockwise; 0 for circles
    fill: tuple[int, int, int] | None = None  # jittered RGB; None means the anchor colour
    outline: int = 0  # darker outline width in px at 224 px; 0 = none

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    objects: list[SceneObject]
    captions: list[str]  # exactly 5 references
    seed: int = 0
    templates: list[str] = field(default_factory=list)  # template name of each caption


# ----------------------------------------------------------------------------
# geometry


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (k, 2) of the shape centred on the origin, circumradius ~1."""
    if shape == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float)
    if shape == "triangle":
        angles = np.radians([-90, 30, 150])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "hexagon":
        angles = np.radians(np.arange(6) * 60)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.radians(-90 + np.arange(10) * 36)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        a = 0.32  # half-width of each arm
        return np.array(
            [
                (-a, -1),
                (a, -1),
                (a, -a),
                (1, -a),
                (1, a),
                (a, a),
                (a, 1),
                (-a, 1),
                (-a, a),
                (-1, a),
                (-1, -a),
                (-a, -a),
            ],
            dtype=float,
        )
    raise ValueError(f"no polygon for shape {shape!r}")


def fitted_polygon(shape: str, rotation: float) -> tuple[np.ndarray | None, float, float]:
    """Rotate the shape, then shift and scale it so its tight bounding box is centred
    on the origin with its longer side 1. Returns (vertices or None for a circle, w, h)."""
    if shape == "circle":
        return None, 1.0, 1.0
    theta = math.radians(rotation)
    c, s = math.cos(theta), math.sin(theta)
    pts = _unit_polygon(shape) @ np.array([[c, -s], [s, c]])  # image y points down
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = (hi - lo).max()
    pts = (pts - (lo + hi) / 2) / extent
    w, h = (hi - lo) / extent
    return pts, float(w), float(h)


def boxes_apart(a, b, gap: float = MIN_GAP) -> bool:
    """True when the two boxes are separated by at least `gap` along x or along y."""
    return b[0] - a[2] >= gap or a[0] - b[2] >= gap or b[1] - a[3] >= gap or a[1] - b[3] >= gap


def relation(a_centre, b_centre) -> str:
    """Where a is relative to b, on the axis where their centres differ most."""
    dx, dy = b_centre[0] - a_centre[0], b_centre[1] - a_centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def relation_is_clear(a_centre, b_centre) -> bool:
    """Only state a spatial relation in references when nobody could argue about it."""
    dx, dy = abs(b_centre[0] - a_centre[0]), abs(b_centre[1] - a_centre[1])
    return max(dx, dy) >= 0.1 and abs(dx - dy) >= 0.06


# ----------------------------------------------------------------------------
# layout


def _sample_kinds(rng: random.Random) -> list[tuple[str, str, str]]:
    """(colour, shape, size) of each object. Some objects repeat an earlier colour+shape
    so captions exercise merged groups ("two red circles")."""
    n = rng.choices((1, 2, 3), weights=(1, 1.5, 1.5))[0]
    kinds: list[tuple[str, str, str]] = []
    for i in range(n):
        if i > 0 and rng.random() < 0.2:
            colour, shape, size = rng.choice(kinds)
            if rng.random() < 0.25:
                size = rng.choice(SIZES)
        else:
            colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES)
        kinds.append((colour, shape, size))
    return _single_group_same_size(kinds)


def _single_group_same_size(kinds):
    """A single mixed-size group has too few distinct phrasings for 5 references."""
    if len({(c, s) for c, s, _ in kinds}) == 1:
        return [(c, s, kinds[-1][2]) for c, s, _ in kinds]
    return kinds


def _place(rng: random.Random, kinds) -> list[SceneObject] | None:
    objects: list[SceneObject] = []
    for colour, shape, size in kinds:
        for _ in range(60):
            side = rng.uniform(*SIZE_RANGE[size])
            rotation = 0.0 if shape == "circle" else round(rng.uniform(0, 360), 2)
            _, w, h = fitted_polygon(shape, rotation)
            w, h = w * side, h * side
            x0 = rng.uniform(EDGE_MARGIN, 1 - EDGE_MARGIN - w)
            y0 = rng.uniform(EDGE_MARGIN, 1 - EDGE_MARGIN - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(boxes_apart(box, o.box) for o in objects):
                break
        else:
            return None
        anchor = COLOURS[colour]
        r, g, b = (
            int(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))) for c in anchor
        )
        fill = (r, g, b)
        outline = rng.randint(1, 3) if rng.random() < 0.5 else 0
        objects.append(SceneObject(shape, colour, size, box, rotation, fill, outline))
    return objects


# ----------------------------------------------------------------------------
# captions


@dataclass
class Group:
    colour: str
    shape: str
    members: list[SceneObject]

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def size(self) -> str | None:
        """The size shared by every member, else None (then no size may be stated)."""
        sizes = {m.size for m in self.members}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def centre(self) -> tuple[float, float]:
        xs, ys = zip(*(m.centre for m in self.members))
        return sum(xs) / len(xs), sum(ys) / len(ys)


def group_objects(objects) -> list[Group]:
    """Merge objects of the same colour and shape (first-seen order)."""
    groups: dict[tuple[str, str], Group] = {}
    for obj in objects:
        key = (obj.colour, obj.shape)
        groups.setdefault(key, Group(obj.colour, obj.shape, [])).members.append(obj)
    return list(groups.values())


def order_groups(groups: list[Group]) -> list[Group]:
    """Canonical caption order: left to right, or top to bottom when the groups are
    spread out more vertically than horizontally."""
    if len(groups) < 2:
        return list(groups)
    xs = [g.centre[0] for g in groups]
    ys = [g.centre[1] for g in groups]
    axis = 0 if max(xs) - min(xs) >= max(ys) - min(ys) else 1
    return sorted(groups, key=lambda g: g.centre[axis])


def phrase(group: Group, sized: bool = False, synonym: bool = False) -> str:
    words = [NUMBER_WORDS[group.count]]
    if sized and group.size:
        words.append(SIZE_SYNONYM[group.size] if synonym else group.size)
    words.append(group.colour)
    words.append(group.shape if group.count == 1 else plural(group.shape))
    return " ".join(words)


def _there(group: Group) -> str:
    return "there is" if group.count == 1 else "there are"


# Each template: name -> (first-pair connector, size style per group, prefix, reversed).
#   connector: "and", "next to" or "rel" (the true spatial relation; needs a clear one)
#   sizing: (first, second, rest) each of "" (no size), "s" (size), "y" (synonym size)
#   reversed: swap the first two groups (so "rel" reads e.g. "to the right of")
_PAIR_TEMPLATES = {
    "and_sized": ("and", ("s", "s", "s"), False, False),
    "rel_plain": ("rel", ("", "", ""), False, False),
    "rel_rev_sized": ("rel", ("s", "y", ""), False, True),
    "there_and": ("and", ("", "s", "s"), True, False),
    "next_syn": ("next to", ("y", "y", "y"), False, False),
    "and_plain": ("and", ("", "", ""), False, False),
    "there_rel": ("rel", ("", "", ""), True, False),
    "rel_sized": ("rel", ("s", "s", ""), False, False),
    "and_rev": ("and", ("", "s", ""), False, True),
    "next_plain": ("next to", ("", "", ""), False, False),
    "there_next": ("next to", ("s", "", ""), True, False),
    "there_plain": ("and", ("", "", ""), True, False),
}

_SINGLE_TEMPLATES = {
    "plain": ("", False),
    "sized": ("s", False),
    "syn": ("y", False),
    "there_plain": ("", True),
    "there_sized": ("s", True),
    "there_syn": ("y", True),
}


def _pair_caption(groups: list[Group], template: str) -> str | None:
    connector, sizing, there, rev = _PAIR_TEMPLATES[template]
    first, second, *rest = groups
    if rev:
        first, second = second, first
    if connector == "rel":
        if not relation_is_clear(first.centre, second.centre):
            return None
        connector = relation(first.centre, second.centre)
    styles = [sizing[0], sizing[1]] + [sizing[2]] * len(rest)
    phrases = [
        phrase(g, sized=st != "", synonym=st == "y")
        for g, st in zip([first, second, *rest], styles)
    ]
    text = f"{phrases[0]} {connector} {phrases[1]}"
    for p in phrases[2:]:
        text += f" and {p}"
    if there:
        text = f"{_there(first)} {text}"
    return text


def _single_caption(group: Group, template: str) -> str:
    style, there = _SINGLE_TEMPLATES[template]
    text = phrase(group, sized=style != "", synonym=style == "y")
    return f"{_there(group)} {text}" if there else text


def make_captions(objects, rng: random.Random, n: int = 5) -> tuple[list[str], list[str]]:
    """n reference captions from n different templates (text distinct too)."""
    groups = order_groups(group_objects(objects))
    candidates: list[tuple[str, str | None]]
    if len(groups) == 1:
        candidates = [(name, _single_caption(groups[0], name)) for name in _SINGLE_TEMPLATES]
    else:
        candidates = [(name, _pair_caption(groups, name)) for name in _PAIR_TEMPLATES]
    seen, usable = set(), []
    for name, text in candidates:
        if text and len(text.split()) <= MAX_WORDS and text not in seen:
            seen.add(text)
            usable.append((name, text))
    rng.shuffle(usable)
    chosen = usable[:n]
    while len(chosen) < n:  # never happens with the templates above; keeps the contract
        chosen.append(usable[len(chosen) % len(usable)])
    names, texts = zip(*chosen)
    return list(texts), list(names)


def make_scene(seed: int) -> Scene:
    """Layout and reference captions of scene `seed` (no pixels)."""
    rng = random.Random(seed)
    kinds = _sample_kinds(rng)
    while True:  # rejection sampling; only crowded layouts of large objects fail
        objects = next((o for o in (_place(rng, kinds) for _ in range(10)) if o), None)
        if objects is not None:
            break
        # keep the object count (3-object scenes matter most) and make one object small
        large = [i for i, k in enumerate(kinds) if k[2] == "large"]
        if large:
            colour, shape, _ = kinds[large[-1]]
            kinds[large[-1]] = (colour, shape, "small")
            kinds = _single_group_same_size(kinds)
        else:
            kinds = _sample_kinds(rng)
    captions, templates = make_captions(objects, rng)
    return Scene(objects=objects, captions=captions, seed=seed, templates=templates)


# ----------------------------------------------------------------------------
# rendering


def _low_saturation_colour(hue: float, sat: float, value: float):
    return np.array(colorsys.hsv_to_rgb(hue, sat, value), dtype=np.float32) * 255


BACKGROUND_STYLES = ("plain", "gradient", "stripes", "checker", "noise")


def background_style(seed: int) -> str:
    return str(np.random.default_rng([seed % 2**63, 1]).choice(BACKGROUND_STYLES))


def _background(seed: int, side: int) -> np.ndarray:
    """(side, side, 3) float32. Style and colours depend on the seed only, so a scene
    looks the same at every side; pixel noise also depends on the side."""
    rng = np.random.default_rng([seed % 2**63, 1])
    style = rng.choice(BACKGROUND_STYLES)
    hue, sat, value = rng.random(), rng.uniform(0, 0.25), rng.uniform(0.25, 0.9)
    # second tone: same hue and saturation, different value (mixes stay low-saturation)
    other = value + rng.choice([-1, 1]) * rng.uniform(0.1, 0.3)
    if not 0.25 <= other <= 0.9:
        other = value - (other - value)
    other = float(np.clip(other, 0.25, 0.9))
    c1 = _low_saturation_colour(hue, sat, value)
    c2 = _low_saturation_colour(hue, sat, other)
    t = (np.arange(side, dtype=np.float32) + 0.5) / side  # pixel centres in 0..1
    x, y = t[None, :], t[:, None]

    if style == "plain":
        mix = np.zeros((side, side), np.float32)
    elif style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = x * np.cos(angle) + y * np.sin(angle)
        mix = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif style == "stripes":
        period, phase = rng.uniform(0.04, 0.15), rng.random()
        along = x if rng.random() < 0.5 else y  # vertical or horizontal stripes
        mix = np.broadcast_to(np.floor(along / (period / 2) + phase) % 2, (side, side))
    elif style == "checker":
        cell = rng.uniform(0.05, 0.2)
        mix = (np.floor(x / cell) + np.floor(y / cell)) % 2
    else:  # noise: multiplicative, so hue and saturation survive; channel sigma <= 25
        sigma = rng.uniform(5, 25)
        noise = np.random.default_rng([seed % 2**63, 2, side]).standard_normal((side, side, 1))
        factor = np.clip(1 + noise.astype(np.float32) * sigma / (value * 255), 0.5, None)
        return np.clip(c1 * factor, 0, 255)
    return c1 + (c2 - c1) * mix[..., None].astype(np.float32)


def render(scene: Scene, side: int = 224) -> Image.Image:
    """RGB image of the scene, deterministic for (scene.seed, side)."""
    ss = 4 if side < 160 else 2  # supersampling factor for anti-aliased edges
    big = side * ss
    colour = Image.new("RGB", (big, big))  # objects over black = premultiplied colour
    alpha = Image.new("L", (big, big))
    draw_colour, draw_alpha = ImageDraw.Draw(colour), ImageDraw.Draw(alpha)
    for obj in scene.objects:
        fill = obj.fill or COLOURS[obj.colour]
        dark = tuple(int(c * 0.55) for c in fill)
        width = 0
        if obj.outline:
            width = max(1, round(obj.outline * side / REFERENCE_SIDE)) * ss
        x0, y0, x1, y1 = (v * big - 0.5 for v in obj.box)  # pixel i covers [i-0.5, i+0.5]
        pts, _, _ = fitted_polygon(obj.shape, obj.rotation)
        if pts is None:
            draw_colour.ellipse(
                (x0, y0, x1, y1), fill=fill, outline=dark if width else None, width=width or 1
            )
            draw_alpha.ellipse((x0, y0, x1, y1), fill=255)
        else:
            scale = max(x1 - x0, y1 - y0)
            xy = [tuple(p) for p in pts * scale + ((x0 + x1) / 2, (y0 + y1) / 2)]
            draw_colour.polygon(xy, fill=fill, outline=dark if width else None, width=width or 1)
            draw_alpha.polygon(xy, fill=255)
    # box-filter downscale; with premultiplied colour this blends edges exactly
    premult = np.asarray(colour.reduce(ss), dtype=np.float32)
    a = np.asarray(alpha.reduce(ss), dtype=np.float32)[..., None] / 255
    image = _background(scene.seed, side) * (1 - a) + premult
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_scene(seed: int, side: int = 224) -> tuple[Scene, Image.Image]:
    scene = make_scene(seed)
    return scene, render(scene, side)


# ----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="Render shapes scenes to PNGs + captions.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="first scene seed")
    parser.add_argument("--side", type=int, default=224)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for seed in range(args.seed, args.seed + args.count):
        scene, image = render_scene(seed, args.side)
        name = f"scene_{seed:06d}.png"
        image.save(out / name)
        index[name] = {
            "seed": seed,
            "captions": scene.captions,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "box": [round(v, 4) for v in o.box],
                    "rotation": o.rotation,
                }
                for o in scene.objects
            ],
        }
    (out / "captions.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {args.count} scenes to {out}")


if __name__ == "__main__":
    main()
