"""Caption metrics: corpus BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al.
2015, as computed by the coco-caption toolkit). Inputs are already tokenized:

    candidates: list[list[str]]            one generated caption per image
    references: list[list[list[str]]]      several reference captions per image
"""

from __future__ import annotations

import math
from collections import Counter


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates, references, max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n: clipped n-gram counts pooled over the corpus, geometric mean
    of precisions 1..n, times the brevity penalty (closest reference length)."""
    assert len(candidates) == len(references)
    matched, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        cand_len += len(cand)
        # the reference length closest to the candidate's; ties go to the shorter one
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1] if refs else 0
        for n in range(1, max_n + 1):
            counts = ngrams(cand, n)
            most_in_any_ref: Counter[tuple[str, ...]] = Counter()
            for r in refs:
                most_in_any_ref |= ngrams(r, n)  # | keeps the max count per n-gram
            matched[n - 1] += sum(min(c, most_in_any_ref[g]) for g, c in counts.items())
            total[n - 1] += max(len(cand) - n + 1, 0)

    if cand_len == 0:
        return [0.0] * max_n
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if matched[n] == 0:  # log(0): this and every higher order score 0
            scores += [0.0] * (max_n - n)
            break
        log_sum += math.log(matched[n] / total[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


def _all_ngrams(tokens: list[str], max_n: int) -> Counter:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        counts.update(ngrams(tokens, n))
    return counts


def cider(candidates, references, max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D. Each sentence becomes one tf-idf vector per n-gram order, with
    document frequencies counted over the images' reference sets. Per image and order:
    cosine-like similarity with the candidate's weights clipped at the reference's,
    damped by a Gaussian in the length difference; averaged over orders and
    references, times 10, then averaged over images."""
    assert len(candidates) == len(references)
    if not candidates:
        return 0.0
    ref_counts = [[_all_ngrams(r, max_n) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))  # an n-gram counts once per image
    log_images = math.log(len(references))

    def weigh(counts: Counter):
        """Per-order {ngram: tf * idf} and the norm of each order's vector."""
        vecs: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            vecs[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
        return vecs, norms

    total = 0.0
    for cand, refs, counts in zip(candidates, references, ref_counts):
        cand_vecs, cand_norms = weigh(_all_ngrams(cand, max_n))
        image_score = 0.0
        for ref, ref_c in zip(refs, counts):
            ref_vecs, ref_norms = weigh(ref_c)
            # lengths differ by the same amount whether counted in words or (as
            # coco-caption does) in bigrams, so words are used
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for cv, rv, cn, rn in zip(cand_vecs, ref_vecs, cand_norms, ref_norms):
                if cn == 0 or rn == 0:
                    continue
                dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in cv.items())
                image_score += penalty * dot / (cn * rn)
        total += 10.0 * image_score / max_n / max(len(refs), 1)
    return total / len(candidates)
