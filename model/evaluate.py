"""Scoring the decoders: python -m model eval

For any data: BLEU-1..4 and CIDEr of the greedy captions against the references.
For the scenes domain also the spec's semantic scores ("What correct means"): exact match, group
recall, hallucination rate, relation accuracy, and — for the attention decoder — localisation:
the share of shape words whose attention argmax falls on the object they name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from model.cache import Example
from model.captioner import Caption, Captioner
from model.data.sources import TEST_SEED_BASE, load_image, scene_examples
from model.metrics import bleu, cider
from model.vocab import fold_articles, tokenize

# The held-out sets of the model card: the same 1,000 scenes three ways.
SCENE_VARIANTS = {"224px PNG": (224, 0), "96px JPEG q70": (96, 70), "1024px JPEG q70": (1024, 70)}


def evaluate(
    captioner: Captioner,
    examples: Sequence[Example],
    batch_size: int = 32,
    decoders: Sequence[str] | None = None,
) -> dict:
    """Greedy-caption every example with each decoder and score the captions."""
    decoders = list(decoders or captioner.decoders)
    captions: dict[str, list[Caption]] = {kind: [] for kind in decoders}
    started = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = captioner.encode([load_image(e.key) for e in chunk])
        for kind in decoders:
            captions[kind] += captioner.greedy(encoded, kind)
    seconds = time.perf_counter() - started
    # BLEU and CIDEr compare words with "an" folded into "a": the renderer's references write "a"
    # before every word, the captioner spells "an orange" (model/vocab.py, with_articles).
    references = [[fold_articles(tokenize(r)) for r in e.captions] for e in examples]
    scenes = None
    if examples and all(e.key.startswith("scene/") for e in examples):
        from model.data.scenes import make_scene

        scenes = [make_scene(int(e.key.split("/")[1])) for e in examples]
    report: dict[str, Any] = {"images": len(examples), "seconds": round(seconds, 1)}
    for kind in decoders:
        candidates = [fold_articles(c.tokens) for c in captions[kind]]
        scores = dict(zip(("bleu1", "bleu2", "bleu3", "bleu4"), bleu(candidates, references)))
        scores["cider"] = cider(candidates, references)
        if scenes is not None:
            scores.update(semantic_scores(scenes, captions[kind]))
        report[kind] = {name: round(float(value), 4) for name, value in scores.items()}
    return report


def semantic_scores(scenes, captions) -> dict:
    from model.data.semantics import aggregate, judge, localisation

    scores = aggregate([judge(scene, " ".join(c.tokens)) for scene, c in zip(scenes, captions)])
    if captions and captions[0].alphas is not None:
        hits = total = 0
        for scene, caption in zip(scenes, captions):
            h, t = localisation(scene, caption.tokens, caption.alphas)
            hits, total = hits + h, total + t
        scores["localisation"] = hits / total if total else 0.0
    return scores


def evaluate_scenes(
    captioner: Captioner,
    count: int = 1000,
    first_seed: int = TEST_SEED_BASE,
    variants: dict = SCENE_VARIANTS,
    log=print,
) -> dict:
    """The model card's table: every variant of the held-out scenes."""
    results = {}
    for name, (side, quality) in variants.items():
        results[name] = evaluate(
            captioner, scene_examples(first_seed, count, side=side, jpeg_quality=quality)
        )
        log(
            f"{name}: "
            + "  ".join(
                f"{kind} exact {results[name][kind].get('exact_match', 0):.3f}"
                for kind in captioner.decoders
            )
        )
    return results


METRIC_ORDER = (
    "exact_match",
    "group_recall",
    "hallucination_rate",
    "relation_accuracy",
    "localisation",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "cider",
)


def format_table(results: dict) -> str:
    """Markdown: one row per (variant, decoder), one column per metric."""
    reports = [value for r in results.values() for value in r.values() if isinstance(value, dict)]
    metrics = [m for m in METRIC_ORDER if any(m in report for report in reports)]
    lines = ["| set | decoder | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, report in results.items():
        for kind in ("attention", "baseline"):
            if kind in report:
                cells = [f"{report[kind][m]:.3f}" if m in report[kind] else "" for m in metrics]
                lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
