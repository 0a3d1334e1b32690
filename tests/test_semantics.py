"""Caption judging and attention localisation against the scene ground truth."""

import numpy as np
import pytest
import torch

from model.data.scenes import Scene, SceneObject, make_scene
from model.data.semantics import Judgement, aggregate, judge, localisation, parse, words

# a large red circle on the left, a small blue square on the right
CIRCLE = SceneObject("circle", "red", "large", (0.05, 0.30, 0.50, 0.75), 0.0)
SQUARE = SceneObject("square", "blue", "small", (0.70, 0.40, 0.90, 0.60), 30.0)
PAIR = Scene([CIRCLE, SQUARE], [], seed=0)

# two small green stars at the top, a small yellow cross below them
STAR_A = SceneObject("star", "green", "small", (0.05, 0.05, 0.25, 0.25), 10.0)
STAR_B = SceneObject("star", "green", "small", (0.55, 0.05, 0.75, 0.25), 50.0)
CROSS = SceneObject("cross", "yellow", "small", (0.30, 0.60, 0.50, 0.80), 0.0)
TRIO = Scene([STAR_A, CROSS, STAR_B], [], seed=1)


def test_every_reference_is_exact():
    for seed in range(300):
        sc = make_scene(seed)
        for cap in sc.captions:
            j = judge(sc, cap)
            assert j.exact, (seed, cap, j)
            assert j.groups_recalled == j.groups_true == j.groups_named
            assert j.hallucinated == 0 and j.relations_correct == j.relations_stated


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle to the left of a blue square",
        "a blue square to the right of a red circle",
        "a large red circle and a small blue square",
        "there is a big red circle next to a little blue square",
        "a blue square and a red circle",
        "an big red circle to the left of one blue square",
    ],
)
def test_true_captions_are_exact(caption):
    assert judge(PAIR, caption).exact


@pytest.mark.parametrize(
    "caption, why",
    [
        ("a green circle to the left of a blue square", "colour"),
        ("a red star to the left of a blue square", "shape"),
        ("two red circles to the left of a blue square", "count"),
        ("a red circle to the right of a blue square", "relation"),
        ("a red circle above a blue square", "relation axis"),
        ("a small red circle and a blue square", "size"),
        ("a red circle and a big blue square", "size"),
        ("a red circle", "missing group"),
        ("a red circle and a blue square and a green star", "extra group"),
    ],
)
def test_wrong_captions_are_rejected(caption, why):
    assert not judge(PAIR, caption).exact, why


def test_judgement_counts():
    assert judge(PAIR, "a green circle to the left of a blue square") == Judgement(
        exact=False,
        groups_named=2,
        groups_true=2,
        groups_recalled=1,
        hallucinated=1,
        relations_stated=1,
        relations_correct=0,
    )
    assert judge(PAIR, "a red circle to the right of a blue square") == Judgement(
        False, 2, 2, 2, 0, 1, 0
    )
    assert judge(PAIR, "two red circles next to a blue square") == Judgement(
        False, 2, 2, 2, 0, 0, 0
    )


def test_groups_and_vertical_relations():
    assert judge(TRIO, "two green stars above a yellow cross").exact
    assert judge(TRIO, "there are two small green stars and a little yellow cross").exact
    assert judge(TRIO, "a yellow cross below two green stars").exact
    assert not judge(TRIO, "a yellow cross above two green stars").exact
    assert not judge(TRIO, "a green star above a yellow cross").exact  # count
    assert not judge(TRIO, "three green stars above a yellow cross").exact
    # mentions of one colour+shape add up
    assert judge(TRIO, "a green star and a green star above a yellow cross").exact


def test_three_group_chain():
    sc = Scene(
        [CIRCLE, SQUARE, SceneObject("star", "green", "small", (0.7, 0.8, 0.85, 0.95), 0)],
        [],
        seed=2,
    )
    assert judge(sc, "a red circle to the left of a blue square and a green star").exact
    j = judge(sc, "a red circle to the left of a blue square above a green star")
    assert j.exact and j.relations_stated == 2
    assert not judge(sc, "a red circle to the left of a blue square below a green star").exact


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "the the of",
        "red red circle circle blue",
        "to the left of",
        "a a a two",
        "circles",
        "a red",
        "left right above below",
        "<unk> <end> 42 !!",
        "stars stars and and",
    ],
)
def test_garbled_captions_never_raise(garbage):
    j = judge(PAIR, garbage)
    assert not j.exact
    assert j.hallucinated == j.groups_named - j.groups_recalled


def test_parse_structure():
    mentions, connectors = parse(words("There are two big red circles, to the LEFT of a cross!"))
    assert [(m.colour, m.shape, m.count, m.size) for m in mentions] == [
        ("red", "circle", 2, "large"),
        (None, "cross", 1, None),
    ]
    assert connectors == ["to the left of"]
    mentions, _ = parse(words("red circles"))
    assert mentions[0].count == 2  # a bare plural means more than one


TOKENS = ["a", "red", "circle", "to", "the", "left", "of", "a", "blue", "square"]


def _maps(cells, rows=7, cols=7):
    maps = np.full((len(TOKENS), rows, cols), 0.01)
    for i, (r, c) in cells.items():
        maps[i, r, c] = 1.0
    return maps


def test_localisation_hits_and_misses():
    # circle map peaks at row 3 col 1 (centre 0.21, 0.5): inside the circle's box
    assert localisation(PAIR, TOKENS, _maps({2: (3, 1), 9: (0, 0)})) == (1, 2)
    # square box x 0.70..0.90, y 0.40..0.60 -> cell (3, 5) centre (0.79, 0.5) hits
    assert localisation(PAIR, TOKENS, _maps({2: (3, 1), 9: (3, 5)})) == (2, 2)
    assert localisation(PAIR, TOKENS, _maps({2: (6, 6), 9: (6, 0)})) == (0, 2)


def test_localisation_dilates_by_half_a_cell():
    # 4x4 grid: cell (1, 2) has centre (0.625, 0.375); the circle box ends at x=0.5,
    # dilated by half a cell (0.125) it reaches 0.625 exactly -> hit; cell (1, 3) misses
    assert localisation(PAIR, TOKENS[:3], _maps({2: (1, 2)}, 4, 4)[:3]) == (1, 1)
    assert localisation(PAIR, TOKENS[:3], _maps({2: (1, 3)}, 4, 4)[:3]) == (0, 1)


def test_localisation_only_counts_true_groups_and_any_member():
    tokens = ["a", "green", "star", "and", "a", "red", "circle", "and", "two", "green", "stars"]
    maps = np.zeros((len(tokens), 10, 10))
    maps[2, 1, 6] = 1  # star B (x 0.55..0.75, y 0.05..0.25) -> hit via the other member
    maps[6, 5, 5] = 1  # red circle is not in TRIO: not counted
    maps[10, 9, 9] = 1  # miss
    assert localisation(TRIO, tokens, maps) == (1, 2)
    # flat (n, rows*cols) and torch input work too
    assert localisation(TRIO, tokens, torch.tensor(maps.reshape(len(tokens), 100))) == (1, 2)


def test_aggregate():
    js = [
        judge(PAIR, "a red circle to the left of a blue square"),
        judge(PAIR, "a green circle to the right of a blue square"),
        judge(TRIO, "two green stars"),
    ]
    agg = aggregate(js)
    assert agg["n"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["group_recall"] == pytest.approx((2 + 1 + 1) / 6)
    assert agg["hallucination_rate"] == pytest.approx(1 / 5)
    assert agg["relation_accuracy"] == pytest.approx(1 / 2)
    assert np.isnan(aggregate([judge(PAIR, "a red circle")])["relation_accuracy"])
