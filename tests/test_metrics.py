"""BLEU and CIDEr-D on hand-computed cases."""

import math

import pytest

from model.metrics import bleu, cider, ngrams


def t(s):
    return s.split()


def test_ngrams():
    assert ngrams(t("a b a b"), 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert ngrams(t("a"), 2) == {}


def test_bleu_identical_is_one():
    cands = [t("a red circle to the left of a blue square"), t("two green stars")]
    refs = [
        [t("a red circle to the left of a blue square"), t("a red circle and a blue square")],
        [t("two green stars"), t("there are two green stars")],
    ]
    assert bleu(cands, refs) == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_bleu_clipped_unigrams():
    # Papineni's example: "the" x7 is clipped to its max count in a reference (2)
    cands = [t("the the the the the the the")]
    refs = [[t("the cat is on the mat"), t("there is a cat on the mat")]]
    scores = bleu(cands, refs)
    assert scores[0] == pytest.approx(2 / 7)  # closest ref length 7 -> no brevity penalty
    assert scores[1:] == [0.0, 0.0, 0.0]


def test_bleu_brevity_penalty():
    scores = bleu([t("the cat")], [[t("the cat is on the mat")]])
    bp = math.exp(1 - 6 / 2)
    assert scores[0] == pytest.approx(bp) and scores[1] == pytest.approx(bp)
    assert scores[2] == scores[3] == 0.0  # no trigrams at all


def test_bleu_pools_counts_over_the_corpus():
    cands = [t("a b c d"), t("a x")]
    refs = [[t("a b c d")], [t("a y")]]
    p = [5 / 6, 3 / 4, 2 / 2, 1 / 1]
    expected = [math.prod(p[:n]) ** (1 / n) for n in range(1, 5)]
    assert bleu(cands, refs) == pytest.approx(expected)


def test_bleu_closest_reference_length_tie_goes_shorter():
    # candidate length 4, refs of 3 and 5: tie -> r = 3 -> c > r -> no penalty
    scores = bleu([t("a b c d")], [[t("a b c"), t("a b c d e")]])
    assert scores[0] == pytest.approx(1.0)


def test_cider_toy_corpus_hand_computed():
    # every n-gram occurs in exactly one image's references, so all idf = log 2 and cancel
    cands = [t("a b"), t("e f")]
    refs = [[t("a b c"), t("a b d")], [t("e f")]]
    unigram = 2 / math.sqrt(2 * 3)  # <a b> . <a b c> / (|.| |.|)
    bigram = 1 / math.sqrt(1 * 2)  # <ab> . <ab bc>
    penalty = math.exp(-1 / 72)  # length 2 vs 3, sigma 6
    image1 = 10 * (unigram + bigram) * penalty / 4
    image2 = 10 * (1 + 1) / 4  # exact match, but only uni+bigrams exist
    assert cider(cands, refs) == pytest.approx((image1 + image2) / 2)


def test_cider_clips_repeated_words():
    # candidate "a a" vs ref "a": tf-idf 2w vs w, clipped dot = w * w, norms 2w and w
    cands, refs = [t("a a"), t("z")], [[t("a")], [t("z")]]
    expected_image1 = 10 * 0.5 * math.exp(-1 / 72) / 4
    assert cider(cands, refs) == pytest.approx((expected_image1 + 10 / 4) / 2)


def test_cider_prefers_matching_candidate():
    refs = [
        [t("a red circle to the left of a blue square"), t("a red circle and a blue square")],
        [t("two green stars above a yellow cross"), t("two green stars and a yellow cross")],
        [t("a purple hexagon"), t("there is a purple hexagon")],
    ]
    good = [
        t("a red circle to the left of a blue square"),
        t("two green stars and a yellow cross"),
        t("a purple hexagon"),
    ]
    bad = [t("a blue square"), t("three orange crosses"), t("a red circle")]
    assert cider(good, refs) > cider(bad, refs) >= 0
    assert cider(good, refs) > 3
