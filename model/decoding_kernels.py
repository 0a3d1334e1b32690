"""Decoding's hottest loops in numba: a step's attention and LSTM cell, and `decode`'s choice of
the next words and rows between steps.

model/decoding.py compiles these (model/compiled.py) for its serving path and keeps numpy
versions of each (`Attend._numpy`, `_lstm_numpy`, `_next_words`, `_distinct`) as the reference
and the fallback; this module imports numba, so only that compiling imports it. The products with
weight matrices stay in ONNX Runtime's MLAS (`Product`), whose kernels no loop here would match.

Why (the 2-core AMD EPYC with AVX-512 of issue 13): the attention had been one small ONNX Runtime
graph of 15 nodes, run once per image a step, each node costing a few microseconds beyond its
arithmetic: 34 / 80 / 134 us at 1 / 3 / 6 rows, where this loop nest takes about 20 us a row over
the rows of every image at once. `decode`'s numpy between steps (the next words, the sampling
draws, np.unique's regrouping of rows) took about 45 us a step, these kernels 5-7. Together with
the LSTM cell and the step's query and gate they made a lone photo (encoding, both greedy captions
and 5 samples) 16 % faster and a batch of 8 photos with 3 samples each 11 % faster (paired
medians, README). Loops are written so that LLVM vectorises the inner one: long, contiguous, free
of calls that are not inlined (hence `tanh` below, not libm's), and of array views (numba counts a
reference for each) and array expressions (slow to compile) inside them.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable


@register_jitable
def tanh(x):
    """tanh of a float32 by the rational minimax approximation of degree 13/6 that Eigen and
    ONNX Runtime's MLAS use (within 3.3e-7 of the true value, tests/test_decoders.py; |x| over 9
    taken as 9, whose tanh is 1 - 3e-8): branch-free, so a loop over it vectorises, where libm's
    scalar tanh would not."""
    x = min(max(x, np.float32(-9.0)), np.float32(9.0))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16) * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06) * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


def attend(alpha, covered, image, keys, query, cells, beta, conv, location, score):
    """One step's attention for every row, as `Attend._numpy` computes it:

        alpha (B, N) the last map, covered (B, F, S, S), image (B,) int64, keys (I, N, A),
        query (B, A), cells (I, N, C), beta (B,), conv (F, 2, k, k), location (F, A), score (A,)
        ->  alpha (B, N), covered (B, F, S, S), gated context (B, C)

    Row b reads image image[b]'s keys and cells, whatever the order of the rows."""
    batch, cells_n = alpha.shape
    filters, side, kernel = covered.shape[1], covered.shape[2], conv.shape[2]
    wide = side + kernel - 1  # a padded row of the map
    span = side * wide  # the conv's outputs as padded rows (the last kernel - 1 of each unused)
    alpha_out = np.empty((batch, cells_n), np.float32)
    covered_out = np.empty_like(covered)
    context = np.empty((batch, cells.shape[2]), np.float32)
    padded = np.zeros(wide * wide + kernel, np.float32)  # the map, zero-padded, row by row
    last, grown = np.empty(span, np.float32), np.empty(span, np.float32)
    where = np.empty((cells_n, filters), np.float32)  # (N, F): the location filters' response
    scores = np.empty(cells_n, np.float32)
    for b in range(batch):
        _pad(alpha[b], side, kernel // 2, wide, padded)
        for f in range(filters):
            _convolve(padded, conv[f], wide, span, last, grown)
            for row in range(side):
                for column in range(side):
                    total = covered[b, f, row, column] + grown[row * wide + column]
                    covered_out[b, f, row, column] = total
                    where[row * side + column, f] = last[row * wide + column] + total
        _scores(keys[image[b]], query[b], where, location, score, scores)
        _softmax(scores, alpha_out[b])
        _context(alpha_out[b], cells[image[b]], beta[b], context[b])
    return alpha_out, covered_out, context


@register_jitable
def _pad(alpha, side, pad, wide, padded):
    for n in range(side * side):
        padded[(n // side + pad) * wide + n % side + pad] = alpha[n]


@register_jitable
def _convolve(padded, taps, wide, span, last, grown):
    """The response of the last map (taps[0]) and of the map added to the past ones (taps[1])
    at every output, as padded rows: one long contiguous loop per tap."""
    for t in range(span):
        last[t], grown[t] = 0, 0
    kernel = taps.shape[1]
    for di in range(kernel):
        for dj in range(kernel):
            to_last, to_grown = taps[0, di, dj], taps[1, di, dj]
            source = padded[di * wide + dj : di * wide + dj + span]
            for t in range(span):
                last[t] += to_last * source[t]
                grown[t] += to_grown * source[t]


@register_jitable
def _scores(keys, query, where, location, score, out):
    """out[n] = score . tanh(keys[n] + query + where[n] @ location), over the A axis. (No array
    views in the loops: each costs numba a reference count, and this took 15 us against 8.)"""
    filters, attention = location.shape
    energy = np.empty(attention, np.float32)
    for n in range(keys.shape[0]):
        for a in range(attention):
            energy[a] = keys[n, a] + query[a]
        f = 0
        while f < filters:  # four filters a pass over energy where they remain: 1.9x faster
            if f + 4 <= filters:
                w0, w1, w2, w3 = where[n, f], where[n, f + 1], where[n, f + 2], where[n, f + 3]
                for a in range(attention):
                    energy[a] += (
                        location[f, a] * w0
                        + location[f + 1, a] * w1
                        + location[f + 2, a] * w2
                        + location[f + 3, a] * w3
                    )
                f += 4
            else:
                w0 = where[n, f]
                for a in range(attention):
                    energy[a] += location[f, a] * w0
                f += 1
        total = np.float32(0)
        for a in range(attention):
            total += score[a] * tanh(energy[a])
        out[n] = total


@register_jitable
def _softmax(scores, out):
    top = scores[0]
    for n in range(1, len(scores)):
        top = max(top, scores[n])
    total = np.float32(0)
    for n in range(len(scores)):
        out[n] = np.exp(scores[n] - top)
        total += out[n]
    for n in range(len(scores)):
        out[n] /= total


@register_jitable
def _context(alpha, cells, beta, out):
    """out = (alpha @ cells) * beta."""
    for c in range(len(out)):
        out[c] = 0
    for n in range(len(alpha)):
        weight = alpha[n]
        for c in range(len(out)):
            out[c] += weight * cells[n, c]
    for c in range(len(out)):
        out[c] *= beta


def lstm(table, words, first, second, c):
    """An LSTM cell's update as `decoding._lstm_numpy` computes it, from its gate pre-activations
    table[words] + first + second (the first 4H columns of each, laid out i, f, o, g with the i, f,
    o quarters halved by the tables: sigmoid(x) = (1 + tanh(x / 2)) / 2), c (B, H)
    -> h (B, H), c (B, H). The sums are made here, not as arrays of their own."""
    batch, hidden = c.shape
    h, c_next = np.empty_like(c), np.empty_like(c)
    half = np.float32(0.5)
    for b in range(batch):
        word = words[b]
        for k in range(hidden):
            i = half * tanh(table[word, k] + first[b, k] + second[b, k]) + half
            j = hidden + k
            f = half * tanh(table[word, j] + first[b, j] + second[b, j]) + half
            j += hidden
            o = half * tanh(table[word, j] + first[b, j] + second[b, j]) + half
            j += hidden
            cell = f * c[b, k] + i * tanh(table[word, j] + first[b, j] + second[b, j])
            c_next[b, k] = cell
            h[b, k] = o * tanh(cell)
    return h, c_next


def query_and_gate(table, words, from_h, gate_b, start, attention):
    """The attention decoder's query (B, A), from_h[:, start:start + A] + table[words, same], and
    its context gate (B,), sigmoid(from_h[:, start + A] + gate_b), as its step computes them."""
    batch = len(words)
    query, beta = np.empty((batch, attention), np.float32), np.empty(batch, np.float32)
    for b in range(batch):
        for a in range(attention):
            query[b, a] = from_h[b, start + a] + table[words[b], start + a]
        beta[b] = np.float32(1) / (np.float32(1) + np.exp(-(from_h[b, start + attention] + gate_b)))
    return query, beta


# ----------------------------------------------------------------------------------------------
# decode's bookkeeping between steps


def next_words(logits, owner, never, sampling, draws, finished, temperature, top_k, eos):
    """Each caption's next word, as `decoding._next_words` chooses it: logits (U, V) of the
    runtime's rows, owner (B,) each caption's row, never (W,) words never written, sampling (B,)
    bool, draws (S,) one uniform number per sampling caption in order, finished (B,) bool
    -> words (B,) int64. (Plain loops rather than np.sort, np.cumsum or np.argmax: numba took
    4.6 s to compile this kernel with them, the first time in a container.)"""
    batch, vocab = len(owner), logits.shape[1]
    words = np.empty(batch, np.int64)
    row = np.empty(vocab, np.float32)
    drawn = 0
    for b in range(batch):
        for word in range(vocab):
            row[word] = logits[owner[b], word]
        for word in never:
            row[word] = -np.inf
        if sampling[b]:
            words[b] = _draw(row, temperature, top_k, draws[drawn])
            drawn += 1
        else:
            best = 0
            for word in range(1, vocab):
                if row[word] > row[best]:  # the first of equal maxima, as np.argmax
                    best = word
            words[b] = best
        if finished[b]:
            words[b] = eos
    return words


@register_jitable
def _draw(row, temperature, top_k, draw):
    """`decoding._draw` for one row (overwritten): the first word whose cumulative probability
    of softmax(row / temperature), within the top k if top_k > 0, passes draw * their total."""
    vocab, scale = len(row), np.float32(max(temperature, 1e-6))
    for word in range(vocab):
        row[word] /= scale
    if 0 < top_k < vocab:
        kth = _kth_smallest(row.copy(), vocab - top_k)  # the k-th largest
        for word in range(vocab):
            if row[word] < kth:
                row[word] = -np.inf
    top = row[0]
    for word in range(1, vocab):
        top = max(top, row[word])
    total = np.float32(0)
    for word in range(vocab):
        row[word] = np.exp(row[word] - top)
        total += row[word]
    cumulative, passed = np.float32(0), 0
    for word in range(vocab):  # cumulative probabilities; the last one is their total
        cumulative += row[word] / total
        row[word] = cumulative
    threshold = draw * np.float64(cumulative)
    for word in range(vocab):
        passed += row[word] <= threshold
    return min(passed, vocab - 1)


@register_jitable
def _kth_smallest(values, k):
    """values' k-th smallest (from 0), as np.partition(values, k)[k] gives it, by quickselect
    (Hoare's partition; `values` is reordered). Plain loops: with np.partition or np.sort numba
    took seconds longer to compile `next_words`, and a count of the larger ones per word took
    vocab^2 steps, far too many for a vocabulary of 10,000."""
    low, high = 0, len(values) - 1
    while low < high:
        pivot = values[(low + high) // 2]
        i, j = low, high
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i, j = i + 1, j - 1
        if k <= j:
            high = j
        elif k >= i:
            low = i
        else:
            break  # values[j + 1 : i] all equal the pivot, k among them
    return values[k]


def distinct(owner, words, finished):
    """`decoding._distinct`: the runtime rows of the next step, one per distinct (row, word)
    among unfinished captions in ascending order of (row, word) -> each caption's new row (B,)
    (0 for finished ones), and per new row its first caption and its parent row. The captions are
    grouped by row (a counting sort, their order kept within a row), and each row's distinct words
    kept sorted by insertion: a row has at most as many words as captions reading it."""
    batch = len(owner)
    rows_before = 0
    for b in range(batch):
        rows_before = max(rows_before, owner[b] + 1)
    starts = np.zeros(rows_before + 1, np.int64)  # where each row's captions begin in `order`
    for b in range(batch):
        if not finished[b]:
            starts[owner[b] + 1] += 1
    for row in range(rows_before):
        starts[row + 1] += starts[row]
    order, filled = np.empty(starts[rows_before], np.int64), starts[:rows_before].copy()
    for b in range(batch):
        if not finished[b]:
            order[filled[owner[b]]] = b
            filled[owner[b]] += 1
    new_owner = np.zeros(batch, np.int64)
    word_of, first = np.empty(len(order), np.int64), np.empty(len(order), np.int64)
    parent = np.empty(len(order), np.int64)
    rows = 0
    for row in range(rows_before):
        base = rows  # this row's new rows start here, one per distinct word, ascending
        for i in range(starts[row], starts[row + 1]):
            b, word = order[i], words[order[i]]
            at = rows
            while at > base and word_of[at - 1] > word:
                at -= 1
            if at > base and word_of[at - 1] == word:
                continue  # an earlier caption of this row wrote it
            for later in range(rows, at, -1):  # make room
                word_of[later], first[later] = word_of[later - 1], first[later - 1]
            word_of[at], first[at], parent[rows] = word, b, row
            rows += 1
        for i in range(starts[row], starts[row + 1]):
            at = base
            while word_of[at] != words[order[i]]:
                at += 1
            new_owner[order[i]] = at
    return new_owner, first[:rows], parent[:rows]
