"""Judge a caption against a shapes scene (spec: "What correct means").

A caption is parsed into mentions ("two small red circles") and the connectors
between consecutive mentions. A connector relates the mention just before it to
the mention just after it ("a red circle to the left of a blue square and a
green star" states circle-left-of-square; "and" / "next to" state nothing that
can be false). Mentions of the same colour+shape are merged by summing counts.

The parser never raises: garbled model output parses into whatever it can.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from model.data.scenes import COLOURS, SHAPES, Group, Scene, group_objects, plural, relation

NUMBER_VALUES = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
SIZE_VALUES = {"small": "small", "little": "small", "large": "large", "big": "large"}
SHAPE_WORDS = {**{s: (s, False) for s in SHAPES}, **{plural(s): (s, True) for s in SHAPES}}


@dataclass
class Mention:
    colour: str | None
    shape: str
    count: int
    size: str | None
    index: int  # token index of the shape word


@dataclass
class Judgement:
    exact: bool
    groups_named: int
    groups_true: int
    groups_recalled: int
    hallucinated: int
    relations_stated: int
    relations_correct: int


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", str(caption).lower())


def _connector(between: list[str]) -> str:
    """The relation stated by the words between two mentions ("and" if nothing spatial)."""
    for word, rel in (
        ("left", "to the left of"),
        ("right", "to the right of"),
        ("above", "above"),
        ("below", "below"),
    ):
        if word in between:
            return rel
    return "and"


def parse(tokens: list[str]) -> tuple[list[Mention], list[str]]:
    """Mentions in order, and the connector between each consecutive pair."""
    mentions: list[Mention] = []
    connectors: list[str] = []
    number = size = colour = None
    gap_start = 0  # first token after the previous mention
    phrase_start = None  # first token of the phrase being built
    for i, tok in enumerate(tokens):
        if tok in SHAPE_WORDS:
            shape, is_plural = SHAPE_WORDS[tok]
            count = number if number is not None else (2 if is_plural else 1)
            if mentions:
                start = phrase_start if phrase_start is not None else i
                connectors.append(_connector(tokens[gap_start:start]))
            mentions.append(Mention(colour, shape, count, size, i))
            number = size = colour = phrase_start = None
            gap_start = i + 1
            continue
        if tok in NUMBER_VALUES:
            number, size, colour = NUMBER_VALUES[tok], None, None  # a number opens a phrase
            phrase_start = i
        elif tok in SIZE_VALUES:
            size = SIZE_VALUES[tok]
            phrase_start = i if phrase_start is None else phrase_start
        elif tok in COLOURS:
            colour = tok
            phrase_start = i if phrase_start is None else phrase_start
        else:
            number = size = colour = phrase_start = None  # other words break a phrase
    return mentions, connectors


def judge(scene: Scene, caption: str) -> Judgement:
    mentions, connectors = parse(words(caption))
    # keyed as mentions are: a mention without a colour (None) finds no group
    truth: dict[tuple[str | None, str], Group] = {
        (g.colour, g.shape): g for g in group_objects(scene.objects)
    }

    named: dict[tuple, int] = {}
    for m in mentions:
        named[(m.colour, m.shape)] = named.get((m.colour, m.shape), 0) + m.count
    recalled = sum(key in truth for key in named)
    groups_match = named == {key: g.count for key, g in truth.items()}

    # a stated size must hold for every member of the named group
    sizes_ok = all(
        m.size is None
        or (
            (m.colour, m.shape) in truth
            and all(o.size == m.size for o in truth[(m.colour, m.shape)].members)
        )
        for m in mentions
    )

    stated = correct = 0
    for a, rel, b in zip(mentions, connectors, mentions[1:]):
        if rel == "and":
            continue
        stated += 1
        ga, gb = truth.get((a.colour, a.shape)), truth.get((b.colour, b.shape))
        if ga is not None and gb is not None and ga is not gb:
            correct += relation(ga.centre, gb.centre) == rel

    return Judgement(
        exact=groups_match and sizes_ok and correct == stated,
        groups_named=len(named),
        groups_true=len(truth),
        groups_recalled=recalled,
        hallucinated=len(named) - recalled,
        relations_stated=stated,
        relations_correct=correct,
    )


def _as_maps(alphas, n_tokens: int) -> np.ndarray:
    """alphas as a float array (n, rows, cols); a flat (n, rows*cols) square grid is reshaped."""
    if hasattr(alphas, "detach"):  # torch tensor
        alphas = alphas.detach().float().cpu().numpy()
    maps = np.asarray(alphas, dtype=np.float64)
    if maps.ndim == 2:
        side = math.isqrt(maps.shape[1])
        maps = maps.reshape(maps.shape[0], side, side)
    return maps[:n_tokens]


def localisation(scene: Scene, tokens: list[str], alphas) -> tuple[int, int]:
    """(hits, total) over shape words naming a (colour, shape) group present in the scene:
    a hit when the argmax cell's centre lies in a member's box dilated by half a cell."""
    maps = _as_maps(alphas, len(tokens))
    # keyed as mentions are: a mention without a colour (None) finds no group
    truth: dict[tuple[str | None, str], Group] = {
        (g.colour, g.shape): g for g in group_objects(scene.objects)
    }
    hits = total = 0
    colour = None
    for i, tok in enumerate(tokens[: len(maps)]):
        tok = str(tok).lower()
        if tok in COLOURS:
            colour = tok
            continue
        if tok not in SHAPE_WORDS:
            continue
        group = truth.get((colour, SHAPE_WORDS[tok][0]))
        colour = None
        if group is None:
            continue
        total += 1
        rows, cols = maps[i].shape
        r, c = divmod(int(np.argmax(maps[i])), cols)
        x, y = (c + 0.5) / cols, (r + 0.5) / rows
        dx, dy = 0.5 / cols, 0.5 / rows
        hits += any(
            x0 - dx <= x <= x1 + dx and y0 - dy <= y <= y1 + dy
            for x0, y0, x1, y1 in (m.box for m in group.members)
        )
    return hits, total


def aggregate(judgements) -> dict:
    js = list(judgements)
    named = sum(j.groups_named for j in js)
    true = sum(j.groups_true for j in js)
    stated = sum(j.relations_stated for j in js)
    return {
        "n": len(js),
        "exact_match": sum(j.exact for j in js) / len(js) if js else float("nan"),
        "group_recall": sum(j.groups_recalled for j in js) / true if true else float("nan"),
        "hallucination_rate": sum(j.hallucinated for j in js) / named if named else 0.0,
        "relation_accuracy": (
            sum(j.relations_correct for j in js) / stated if stated else float("nan")
        ),
        "relations_stated": stated,
    }
