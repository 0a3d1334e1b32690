"""Decoding (model/decoding.py, numpy) against the teacher-forced torch pass, on randomly
initialised decoders, and the Captioner's decoding against the bundled weights."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.decoders import DecoderConfig, build_decoder, decoder_tables
from model.decoding import (
    Attend,
    Product,
    _Choice,
    _distinct,
    _lstm,
    _next_words,
    beam_search,
    compiled_kernels,
    decode,
    greedy,
    load_tables,
    runtime,
    save_tables,
)

BOS, EOS, VOCAB = 1, 2, 30


def make(kind, seed=0, num_cells=49):
    torch.manual_seed(seed)
    decoder = build_decoder(
        DecoderConfig(
            kind=kind,
            vocab_size=VOCAB,
            feature_dim=40,
            num_cells=num_cells,
            embed_dim=16,
            hidden_dim=32,
            attention_dim=24,
            cell_dim=32,
            layout_dim=4,
        )
    )
    with torch.no_grad():
        # Bias the output layer so that captions end within a few words, as a trained decoder's
        # do, and give the feature normalisation statistics that are not the identity's.
        decoder.fc.bias[EOS] += 1.5
        decoder.norm.mean.normal_(generator=torch.Generator().manual_seed(seed))
        decoder.norm.std.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(seed))
    return decoder.eval()


def steps(kind, seed=0, compiled=True, int8=False):
    return runtime(decoder_tables(make(kind, seed)), compiled, int8)


def grids(batch=3, seed=1):
    return torch.randn(batch, 49, 40, generator=torch.Generator().manual_seed(seed)).numpy()


def assert_maps_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert (a is None and b is None) or np.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_numpy_steps_equal_the_teacher_forced_torch_pass(kind, compiled):
    decoder, grid = make(kind), grids()
    inputs = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    inputs[:, 0] = BOS
    with torch.no_grad():
        full_logits, full_alphas = decoder(torch.from_numpy(grid), inputs)
    numpy_steps = runtime(decoder_tables(decoder), compiled)
    state, step_logits, step_alphas = numpy_steps.start(grid), [], []
    for t in range(inputs.shape[1]):
        logits, alpha = numpy_steps.step(inputs[:, t].numpy(), state)
        step_logits.append(logits)
        step_alphas.append(alpha)
    np.testing.assert_allclose(np.stack(step_logits, 1), full_logits.numpy(), rtol=1e-5, atol=1e-5)
    if kind == "attention":
        np.testing.assert_allclose(np.stack(step_alphas, 1), full_alphas.numpy(), atol=1e-6)
        assert np.allclose(full_alphas.sum(-1), 1.0)  # a distribution over cells
    else:
        assert full_alphas is None and step_alphas[0] is None


def repeated_grids(columns: slice, k: int, side: int = 6, batch: int = 3) -> np.ndarray:
    """Random grids (batch, side * side, 40) whose `columns` repeat over k x k blocks of cells,
    as the encoder's block-6 tap does on its 14x14 grid."""
    grid = grids(batch)[:, : side * side].reshape(batch, side, side, 40)
    coarse = grid[:, ::k, ::k, columns].repeat(k, axis=1).repeat(k, axis=2)
    grid = grid.copy()
    grid[..., columns] = coarse
    return np.ascontiguousarray(grid.reshape(batch, side * side, 40))


@pytest.mark.parametrize("k", [2, 3])
def test_repeated_columns_read_once_a_block_give_the_torch_pass(k):
    """The attention decoder's image graph reads the columns that repeat over k x k blocks at
    one cell per block; on grids so made its steps equal torch's, and on grids whose columns do
    not repeat they do not (the shortcut really skips the other cells)."""
    decoder, columns = make("attention", num_cells=36), slice(12, 32)
    inputs = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    inputs[:, 0] = BOS
    shortcut = runtime(decoder_tables(decoder), repeated=(columns.start, columns.stop, k))

    def logits(grid):
        state, out = shortcut.start(grid), []
        for t in range(inputs.shape[1]):
            out.append(shortcut.step(inputs[:, t].numpy(), state)[0])
        with torch.no_grad():
            full = decoder(torch.from_numpy(grid), inputs)[0].numpy()
        return np.stack(out, 1), full

    ours, torch_logits = logits(repeated_grids(columns, k))
    np.testing.assert_allclose(ours, torch_logits, rtol=1e-5, atol=1e-5)
    ours, torch_logits = logits(np.ascontiguousarray(grids()[:, :36]))
    assert np.abs(ours - torch_logits).max() > 1e-3


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_tables_saved_and_loaded_decode_alike(kind, tmp_path):
    tables = decoder_tables(make(kind))
    save_tables(tables, tmp_path / "tables.npz")
    loaded = load_tables(tmp_path / "tables.npz")
    assert loaded.config == tables.config and loaded.arrays.keys() == tables.arrays.keys()
    grid = grids(4)
    assert decode(runtime(loaded), grid, BOS, EOS)[0] == decode(runtime(tables), grid, BOS, EOS)[0]


def test_decoding_from_saved_tables_imports_no_torch(tmp_path):
    for kind in ("baseline", "attention"):
        save_tables(decoder_tables(make(kind)), tmp_path / f"{kind}.npz")
    np.save(tmp_path / "grid.npy", grids(2))
    expected = {
        kind: decode(steps(kind), grids(2), BOS, EOS)[0] for kind in ("baseline", "attention")
    }
    script = f"""
import json, sys
from pathlib import Path
import numpy as np
from model.decoding import beam_search, decode, load_tables, runtime
folder, grid, out = Path({str(tmp_path)!r}), np.load({str(tmp_path / "grid.npy")!r}), {{}}
for kind in ("baseline", "attention"):
    steps = runtime(load_tables(folder / f"{{kind}}.npz"))
    out[kind] = decode(steps, grid, {BOS}, {EOS})[0]
    decode(steps, grid, {BOS}, {EOS}, greedy=False, rng=np.random.default_rng(0))
    beam_search(steps, grid, {BOS}, {EOS}, width=3)
assert "torch" not in sys.modules, "decoding imported torch"
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_compiled_and_numpy_steps_decode_alike(kind, int8):
    grid = grids(5)
    compiled, numpy = steps(kind, int8=int8), steps(kind, compiled=False, int8=int8)
    assert decode(compiled, grid, BOS, EOS)[0] == decode(numpy, grid, BOS, EOS)[0]


@pytest.mark.parametrize("mlas", [True, False])
def test_an_int8_product_is_the_float_product_within_its_rounding_row_by_row(mlas):
    rng = np.random.default_rng(0)
    columns = np.linspace(0.01, 1, 48, dtype=np.float32)  # of very different sizes
    w = rng.standard_normal((64, 48)).astype(np.float32) * columns
    x = np.tanh(rng.standard_normal((5, 64)) * 2).astype(np.float32)
    x[3] = 0.0  # an all-zero row
    product = Product(w, mlas, int8=True)
    y = product(x)
    # Each operand is off by at most half its integer step (max|x| / 63 per row of x, max|w| / 127
    # per column of w), so an entry by at most sum|x| w_step / 2 + x_step sum|w| / 2 + K steps / 4.
    x_step = np.abs(x).max(1, keepdims=True) / Product.X_STEPS
    w_step = np.abs(w).max(0) / 127
    bound = np.abs(x).sum(1, keepdims=True) * w_step / 2 + x_step * np.abs(w).sum(0) / 2
    bound += len(w) * x_step * w_step / 4
    error = np.abs(y - x @ w)
    assert (error <= bound * 1.001 + 1e-6).all() and error.max() > 0  # rounded, within its steps
    assert (y[3] == 0).all()
    for i in range(len(x)):  # a row's result does not depend on the rows beside it
        assert (product(x[i : i + 1]) == y[i : i + 1]).all()
    other = Product(w, not mlas, int8=True)(x)  # ONNX Runtime and numpy: the same integers
    np.testing.assert_allclose(other, y, rtol=1e-6, atol=1e-7)


def without_vnni(rounded: np.ndarray, w_int8: np.ndarray, zero: int) -> np.ndarray:
    """MLAS's integer product as its kernels for x86 CPUs without VNNI compute it (AVX2: each two
    neighbouring products of uint8 x and int8 w added in 16 bits, saturating, by vpmaddubsw; then
    summed in 32 bits), less the zero point's share."""
    a = rounded.astype(np.int64) + zero  # (B, K): the uint8 values the kernel reads
    w = w_int8.astype(np.int64)  # (K, O)
    pairs = np.einsum("bkp,kpo->bko", a.reshape(len(a), -1, 2), w.reshape(-1, 2, w.shape[1]))
    return np.clip(pairs, -(2**15), 2**15 - 1).sum(1) - zero * w.sum(0)


@pytest.mark.parametrize("mlas", [True, False])
def test_an_int8_product_is_the_same_on_cpus_without_vnni(mlas):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[:, 0] = 1.0  # a column all at the int8 maximum, 127
    x = np.tanh(rng.standard_normal((6, 64)) * 2).astype(np.float32)
    x[4], x[5] = 1.0, -1.0  # rows all at their maximum: every pair of products at its largest
    product = Product(w, mlas, int8=True)
    rounded, row_scale = product.rounded_rows(x)
    assert np.abs(rounded).max() == Product.X_STEPS and np.abs(product.w_int8).max() == 127
    integers = without_vnni(rounded, product.w_int8, Product.X_ZERO)
    np.testing.assert_array_equal(
        integers, rounded.astype(np.int64) @ product.w_int8
    )  # no pair saturated
    expected = integers.astype(np.float32) * (row_scale * product.w_scale)
    np.testing.assert_allclose(product(x), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_float16_grids_decode_as_their_float32_values(kind, compiled):
    half = grids(4).astype(np.float16)
    ids, alphas = decode(steps(kind, compiled=compiled), half, BOS, EOS)
    ids32, alphas32 = decode(steps(kind, compiled=compiled), half.astype(np.float32), BOS, EOS)
    assert ids == ids32
    assert_maps_equal(alphas, alphas32)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_beam_of_width_one_is_greedy(kind, int8):
    grid = grids(5)
    greedy_ids, greedy_alphas = decode(steps(kind, int8=int8), grid, BOS, EOS)
    beam_ids, beam_alphas = beam_search(steps(kind, int8=int8), grid, BOS, EOS, width=1)
    assert beam_ids == greedy_ids
    assert_maps_equal(beam_alphas, greedy_alphas)


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_sampling_near_zero_temperature_is_greedy(kind):
    grid = grids(4)
    greedy_ids, _ = decode(steps(kind), grid, BOS, EOS)
    cold_ids, _ = decode(
        steps(kind), grid, BOS, EOS, greedy=False, temperature=1e-4, rng=np.random.default_rng(0)
    )
    assert cold_ids == greedy_ids


@pytest.mark.parametrize("int8", [False, True])
def test_batched_greedy_equals_one_image_at_a_time(int8):
    attention, grid = steps("attention", int8=int8), grids(4)
    together, _ = decode(attention, grid, BOS, EOS)
    alone = [decode(attention, grid[i : i + 1], BOS, EOS)[0][0] for i in range(4)]
    assert together == alone


@pytest.mark.parametrize("max_len", [1, 20])
def test_the_baselines_greedy_loop_writes_what_decode_does(max_len):
    """One ONNX graph looping over the steps (BaselineRuntime.greedy), on a batch whose captions
    end at once, after a word, or run to max_len: the same words as decode, for the batch and
    for each image alone."""
    tables = decoder_tables(make("baseline"))
    tables.arrays["fc_b"][EOS] -= 1.3  # ended by 0, 1 and 20 words (seen), as seed 0 draws
    baseline, grid = runtime(tables), grids(6)
    expected = decode(baseline, grid, BOS, EOS, max_len)
    assert baseline.greedy(grid, BOS, EOS, max_len, ()) is not None  # the loop ran
    assert greedy(baseline, grid, BOS, EOS, max_len) == expected
    for i in range(len(grid)):
        alone = greedy(baseline, grid[i : i + 1], BOS, EOS, max_len)
        assert alone == ([expected[0][i]], [None])


def test_the_bundled_baselines_greedy_loop_writes_what_decode_does():
    """The bundled baseline on 48 held-out scenes, with its banned words and with its most
    written word banned as well."""
    from model.captioner import Captioner
    from model.data.scenes import render_scene

    captioner = Captioner.load()
    baseline, (bos, eos) = (
        captioner.runtimes["baseline"],
        (captioner.vocab.bos, captioner.vocab.eos),
    )
    encoded = captioner.encode([render_scene(30_000_000 + seed)[1] for seed in range(48)])
    grid = captioner._stack(encoded)
    written = [
        w for ids in decode(baseline, grid, bos, eos, banned=captioner._banned)[0] for w in ids
    ]
    for banned in (captioner._banned, (*captioner._banned, max(set(written), key=written.count))):
        expected = decode(baseline, grid, bos, eos, banned=banned)
        assert len({tuple(ids) for ids in expected[0]}) > 10
        assert greedy(baseline, grid, bos, eos, banned=banned) == expected


def test_without_onnxruntime_greedy_is_decode():
    numpy_only, grid = steps("baseline", compiled=False), grids(4)
    assert numpy_only.greedy(grid, BOS, EOS, 20, ()) is None
    assert greedy(numpy_only, grid, BOS, EOS) == decode(numpy_only, grid, BOS, EOS)


def test_rows_in_any_image_order_attend_their_own_images_cells_kept_once():
    attention, grid = steps("attention"), grids(3)
    rows = np.array([2, 0, 0, 2, 1, 2])  # runs of one image: 2 | 0 0 | 2 | 1 | 2
    ids, alphas = decode(attention, grid, BOS, EOS, rows=rows)
    alone = [decode(attention, grid[i : i + 1], BOS, EOS) for i in range(3)]
    assert ids == [alone[i][0][0] for i in rows]
    assert_maps_equal(alphas, [alone[i][1][0] for i in rows])
    state = attention.select(attention.start(grid), np.repeat(np.arange(3), 16))
    assert len(state["c"]) == 48 and len(state["cells"]) == len(state["keys"]) == 3


def test_samples_of_one_image_decode_in_one_batch_and_vary():
    grid = grids(1)
    ids, alphas = decode(
        steps("attention"),
        grid,
        BOS,
        EOS,
        greedy=False,
        temperature=1.5,
        rng=np.random.default_rng(0),
        rows=np.zeros(16, dtype=int),
    )
    assert len(ids) == 16 and len({tuple(i) for i in ids}) > 1
    assert all(EOS not in i and BOS not in i for i in ids)
    assert all(a.shape == (len(i), 49) for i, a in zip(ids, alphas))


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_samples_with_a_seed_are_reproducible(kind):
    def draw(seed):
        return decode(
            steps(kind),
            grids(2),
            BOS,
            EOS,
            greedy=False,
            temperature=1.5,
            rng=np.random.default_rng(seed),
            rows=np.array([0, 0, 0, 1, 1, 1]),
        )[0]

    assert draw(7) == draw(7) and draw(7) != draw(8)


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_starting_once_per_image_equals_repeating_its_grid(kind):
    grid, rows = grids(2), np.array([0, 0, 0, 1, 1, 1])
    options = dict(greedy=False, temperature=1.5)
    repeated, _ = decode(steps(kind), grid[rows], BOS, EOS, rng=np.random.default_rng(4), **options)
    started_once, _ = decode(
        steps(kind), grid, BOS, EOS, rng=np.random.default_rng(4), rows=rows, **options
    )
    assert started_once == repeated


@pytest.mark.parametrize("int8", [False, True])
def test_greedy_captions_and_samples_decode_together_as_they_would_apart(int8):
    attention, grid = steps("attention", int8=int8), grids(2)
    greedy_ids, greedy_alphas = decode(attention, grid, BOS, EOS)
    sample_rows = np.array([0, 0, 0, 1, 1, 1])
    options = dict(temperature=1.5, rows=sample_rows)
    sample_ids, _ = decode(
        attention, grid, BOS, EOS, greedy=False, rng=np.random.default_rng(4), **options
    )
    rows = np.concatenate([np.arange(2), sample_rows])
    ids, alphas = decode(
        attention,
        grid,
        BOS,
        EOS,
        temperature=1.5,
        rng=np.random.default_rng(4),
        rows=rows,
        greedy=np.arange(len(rows)) < 2,
    )
    assert ids[:2] == greedy_ids and ids[2:] == sample_ids
    assert_maps_equal(alphas[:2], greedy_alphas)


def test_a_caption_cut_at_the_word_limit_says_so():
    """A caption that runs to MAX_LEN words without ending (here: the end banned) or ends
    mid-phrase ends in "…", its words and maps unchanged; the bundled captioner's captions of a
    scene end whole."""
    from model.captioner import MAX_LEN, UNFINISHED, Captioner
    from model.data.scenes import render_scene

    image = render_scene(30_000_000)[1]
    never_ending = Captioner.untrained(seed=3)
    never_ending._banned = (*never_ending._banned, never_ending.vocab.eos)
    cut = never_ending.captions(never_ending.encode([image]), 2)[0]
    for caption in (cut.attention, cut.baseline):
        assert len(caption.tokens) == MAX_LEN
        assert caption.text == " ".join(caption.tokens) + " " + UNFINISHED
    assert len(cut.attention.alphas) == MAX_LEN
    assert all(sample.endswith(" " + UNFINISHED) for sample in cut.samples)
    whole = Captioner.load()
    ended = whole.captions(whole.encode([image]), 2)[0]
    for caption in (ended.attention, ended.baseline):
        assert len(caption.tokens) < MAX_LEN and caption.text == " ".join(caption.tokens)
    assert not any(UNFINISHED in sample for sample in ended.samples)
    words = ["a", "red", "circle", "and", "a"]
    assert whole._spelled([whole.vocab.index[w] for w in words]) == (words, "a red circle and a …")


@pytest.mark.parametrize("threads", [1, 2])
def test_captioner_captions_equal_its_separate_calls(threads, monkeypatch):
    """With two threads (as the bot sets them) a lone photo's baseline caption is written on a
    thread of its own, beside the attention decoder's captions; a batch's on the calling one."""
    import threading

    from model.captioner import Captioner
    from model.data.scenes import render_scene

    untrained = Captioner.untrained(seed=3)
    with torch.no_grad():
        for decoder in untrained.modules.values():  # random decoders: end captions early
            decoder.fc.bias[untrained.vocab.eos] += 2.0
    captioner = Captioner.from_modules(untrained.encoder, untrained.modules, untrained.vocab)
    torch_threads = torch.get_num_threads()
    try:
        captioner.set_cpu_threads(threads)
    finally:
        torch.set_num_threads(torch_threads)  # set_cpu_threads sets it process-wide
    decoding_threads = []
    greedy = captioner._greedy

    def recorded(grid, decoder):
        decoding_threads.append((decoder, threading.current_thread() is threading.main_thread()))
        return greedy(grid, decoder)

    monkeypatch.setattr(captioner, "_greedy", recorded)
    encoded = captioner.encode([render_scene(seed)[1] for seed in range(3)])
    lone = captioner.captions(encoded[:1], 4, temperature=1.3, seed=9)
    assert decoding_threads == [("baseline", threads == 1)]
    assert lone[0].baseline == captioner.greedy(encoded[:1], "baseline")[0]
    decoding_threads.clear()
    together = captioner.captions(encoded, 4, temperature=1.3, seed=9)
    assert decoding_threads == [("baseline", True)]
    headlines = captioner.greedy(encoded, "attention")
    assert [c.attention.tokens for c in together] == [c.tokens for c in headlines]
    assert [c.attention.alphas for c in together] == [c.alphas for c in headlines]
    assert [c.baseline.text for c in together] == [
        c.text for c in captioner.greedy(encoded, "baseline")
    ]
    assert [c.samples for c in together] == captioner.sample(encoded, 4, temperature=1.3, seed=9)
    assert captioner.captions(encoded, 4, seed=9) == captioner.captions(encoded, 4, seed=9)
    assert captioner.captions([], 4) == []


def torch_greedy(decoder, grid, bos, eos, banned, max_len=20):
    """Greedy decoding by the teacher-forced torch pass over the growing prefix: the reference."""
    ids = [bos]
    with torch.no_grad():
        for _ in range(max_len):
            logits, alphas = decoder(grid, torch.tensor([ids]))
            last = logits[0, -1].clone()
            last[list(banned) + [bos]] = float("-inf")
            word = int(last.argmax())
            if word == eos:
                break
            ids.append(word)
    return ids[1:], None if alphas is None else alphas[0, : len(ids) - 1].numpy()


def test_bundled_greedy_captions_equal_the_torch_pass():
    """The bundle's decoding tables in float32 equal torch to float rounding; as served (the
    attention decoder's product of h in int8) they write the same words, looking where torch does
    to within 0.01 (seen: 0.002)."""
    from model.captioner import DEFAULT_WEIGHTS_DIR, Captioner, load_decoder
    from model.data.scenes import render_scene
    from model.decoding import Tables

    captioner = Captioner.load()
    served = captioner.runtimes
    assert served["attention"].from_h.int8 and not served["attention"].context.int8
    exact = {kind: runtime(Tables(r.config, r.a)) for kind, r in served.items()}
    encoded = captioner.encode([render_scene(30_000_000 + seed)[1] for seed in range(8)])
    for runtimes, atol in ((exact, 1e-5), (served, 1e-2)):
        captioner.runtimes = runtimes
        for kind in captioner.decoders:
            decoder = load_decoder(DEFAULT_WEIGHTS_DIR / f"{kind}.pt")
            captions = captioner.greedy(encoded, kind)
            for one, caption in zip(encoded, captions):
                grid = torch.as_tensor(np.asarray(one.grid, dtype=np.float32))[None]
                ids, alphas = torch_greedy(
                    decoder, grid, captioner.vocab.bos, captioner.vocab.eos, captioner._banned
                )
                assert caption.tokens == captioner._captions([ids], [None])[0].tokens
                if alphas is not None:
                    np.testing.assert_allclose(
                        np.reshape(caption.alphas, alphas.shape), alphas, atol=atol
                    )


def test_top_k_one_is_greedy():
    grid = grids(4)
    greedy_ids, _ = decode(steps("baseline"), grid, BOS, EOS)
    top1_ids, _ = decode(
        steps("baseline"),
        grid,
        BOS,
        EOS,
        greedy=False,
        temperature=2.0,
        top_k=1,
        rng=np.random.default_rng(0),
    )
    assert top1_ids == greedy_ids


def test_beam_search_finds_a_caption_at_least_as_likely_as_greedy():
    decoder, grid = make("attention", seed=3), grids(4, seed=5)

    def log_prob(row, ids):
        inputs = torch.tensor([[BOS] + ids])
        with torch.no_grad():
            logits, _ = decoder(torch.from_numpy(grid[row : row + 1]), inputs)
        log_probs = logits[0].log_softmax(1)
        return sum(log_probs[t, word].item() for t, word in enumerate(ids + [EOS]))

    attention = runtime(decoder_tables(decoder))
    greedy_ids, _ = decode(attention, grid, BOS, EOS)
    beam_ids, _ = beam_search(attention, grid, BOS, EOS, width=4)
    for row in range(4):
        assert log_prob(row, beam_ids[row]) >= log_prob(row, greedy_ids[row]) - 1e-4


def test_doubly_stochastic_regulariser_prefers_attention_spread_over_cells():
    decoder = make("attention")
    mask = torch.ones(1, 49)
    spread = torch.eye(49).unsqueeze(0)  # 49 steps, each on its own cell
    stuck = torch.zeros(1, 49, 49)
    stuck[:, :, 0] = 1.0  # every step on cell 0
    assert decoder.regulariser(spread, mask).item() == pytest.approx(0.0)
    assert decoder.regulariser(stuck, mask).item() > 0.5 * decoder.config.alpha_c


def test_attention_knows_where_each_cell_is():
    # The same two cells, swapped. A decoder blind to position sees one and the same set of
    # cells: its attention map would simply follow the swap, and it could not say which object
    # is on the left.
    attention = steps("attention")
    grid = np.zeros((1, 49, 40), np.float32)
    grid[0, 3], grid[0, 45] = 1.0, -1.0
    swapped = grid.copy()
    swapped[0, 3], swapped[0, 45] = grid[0, 45], grid[0, 3]
    words = np.array([BOS])
    logits, alpha = attention.step(words, attention.start(grid))
    logits_swapped, alpha_swapped = attention.step(words, attention.start(swapped))
    followed = alpha.copy()
    followed[0, 3], followed[0, 45] = alpha[0, 45], alpha[0, 3]
    assert not np.allclose(alpha_swapped, followed, atol=1e-4)
    assert not np.allclose(logits, logits_swapped, atol=1e-6)


def test_baseline_reads_a_fine_grid_averaged_to_seven_by_seven():
    config = dict(
        kind="baseline", vocab_size=VOCAB, feature_dim=40, embed_dim=16, hidden_dim=32, layout_dim=4
    )
    torch.manual_seed(0)
    fine = build_decoder(DecoderConfig(num_cells=196, **config)).eval()
    coarse = build_decoder(DecoderConfig(num_cells=49, **config)).eval()
    coarse.load_state_dict(fine.state_dict())  # same shapes: both read 7x7
    grid = torch.randn(2, 196, 40, generator=torch.Generator().manual_seed(3))
    pooled = (
        torch.nn.functional.avg_pool2d(grid.transpose(1, 2).unflatten(2, (14, 14)), 2)
        .flatten(2)
        .transpose(1, 2)
    )
    words = np.array([BOS, BOS])
    fine_steps, coarse_steps = runtime(decoder_tables(fine)), runtime(decoder_tables(coarse))
    fine_logits, _ = fine_steps.step(words, fine_steps.start(grid.numpy()))
    coarse_logits, _ = coarse_steps.step(words, coarse_steps.start(pooled.numpy()))
    np.testing.assert_allclose(fine_logits, coarse_logits, rtol=1e-5, atol=1e-5)


def test_attention_remembers_where_it_has_looked():
    # The state carries the last attention map and the past maps' sum; the next map depends on
    # them, so that a colour word and its shape word stay on one object and a described object
    # is not described again.
    attention, grid = steps("attention"), grids(batch=1)
    state = attention.start(grid)
    for word in (BOS, 5, 7):
        _, alpha = attention.step(np.array([word]), state)
    assert np.array_equal(state["alpha"], alpha)
    _, alpha_looked = attention.step(np.array([BOS]), state)
    _, alpha_fresh = attention.step(np.array([BOS]), attention.start(grid))
    assert not np.allclose(alpha_fresh, alpha_looked, atol=1e-5)


def test_articles_agree_with_the_next_word_one_word_per_word():
    from model.vocab import fold_articles, with_articles

    assert with_articles(["a", "orange", "circle", "and", "a", "large", "orange", "star"]) == [
        "an",
        "orange",
        "circle",
        "and",
        "a",
        "large",
        "orange",
        "star",
    ]
    assert with_articles(["an", "red", "square"]) == ["a", "red", "square"]
    assert with_articles(["a"]) == ["a"] and with_articles([]) == []
    assert with_articles(["a", "unicorn", "and", "an", "hour"]) == [
        "a",
        "unicorn",
        "and",
        "an",
        "hour",
    ]
    assert fold_articles(["an", "orange", "circle"]) == ["a", "orange", "circle"]


# The compiled kernels (model/decoding_kernels.py) against their numpy twins


def test_numba_is_there_so_the_compiled_kernels_are_what_these_tests_check():
    assert compiled_kernels() is not None


@pytest.mark.parametrize("side, kernel", [(7, 5), (14, 5), (4, 3)])
def test_the_compiled_attention_equals_numpys_for_rows_of_any_image(side, kernel):
    rng = np.random.default_rng(side)
    images, rows, filters, attention, channels = 3, 7, 8, 24, 32
    cells_n = side * side
    a = {
        "location_conv": rng.standard_normal((filters, 2, kernel, kernel)).astype(np.float32),
        "location_w": rng.standard_normal((filters, attention)).astype(np.float32),
        "score_w": rng.standard_normal(attention).astype(np.float32),
    }
    alpha = rng.dirichlet(np.ones(cells_n), rows).astype(np.float32)
    covered = rng.standard_normal((rows, filters, side, side)).astype(np.float32)
    image = np.array([2, 0, 0, 2, 1, 2, 1])  # runs of one image, in any order
    keys = rng.standard_normal((images, cells_n, attention)).astype(np.float32)
    query = rng.standard_normal((rows, attention)).astype(np.float32)
    cells = rng.standard_normal((images, cells_n, channels)).astype(np.float32)
    beta = rng.uniform(0, 1, rows).astype(np.float32)
    inputs = (alpha, covered, image, keys, query, cells, beta)
    compiled = Attend(a, side, compiled=True)(*inputs)
    numpy = Attend(a, side, compiled=False)(*inputs)
    for got, expected in zip(compiled, numpy):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(compiled[0] - numpy[0]).max() > 0  # two computations, not one


def test_the_compiled_lstm_cell_equals_numpys():
    rng = np.random.default_rng(0)
    hidden, words = 16, np.array([3, 0, 3, 1, 2])
    table = rng.standard_normal((4, 4 * hidden + 7)).astype(np.float32)
    first = (rng.standard_normal((5, 4 * hidden)) * 2).astype(np.float32)
    second = (rng.standard_normal((5, 4 * hidden + 9)) * 2).astype(np.float32)
    c = rng.standard_normal((5, hidden)).astype(np.float32)
    h, c_next = _lstm(table, words, first, second, c, compiled_kernels())
    expected_h, expected_c = _lstm(table, words, first, second, c, None)
    np.testing.assert_allclose(h, expected_h, atol=1e-6)
    np.testing.assert_allclose(c_next, expected_c, atol=1e-6)
    assert np.abs(h - expected_h).max() > 0  # two computations, not one


def test_the_compiled_tanh_is_within_its_error_of_the_true_one():
    import numba

    from model.decoding_kernels import tanh

    @numba.njit
    def tanh_of(x):
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = tanh(x[i])
        return out

    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    assert np.abs(tanh_of(x) - np.tanh(x.astype(np.float64))).max() < 3.5e-7


@pytest.mark.parametrize("top_k", [0, 3])
def test_the_compiled_choice_of_words_and_rows_equals_numpys(top_k):
    rng = np.random.default_rng(top_k)
    kernels = compiled_kernels()
    for trial in range(300):
        # small batches, and large ones whose captions read their rows in any order (as
        # Captioner.captions' greedy captions first, then the samples)
        large = trial % 3 == 0
        batch, rows = rng.integers(1, 300 if large else 9), rng.integers(1, 40)
        vocab = 3000 if trial % 50 == 1 else 12  # a COCO-sized vocabulary now and then
        logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 2
        logits = np.round(logits, 1)  # with ties
        owner = rng.integers(0, rows, batch)
        owner = owner if large else np.sort(owner)
        sampling = rng.random(batch) < 0.6
        finished = rng.random(batch) < 0.2
        choice = _Choice(np.array([1, 4]), sampling, float(rng.uniform(0.5, 2)), top_k, EOS)
        draws = rng.random(sampling.sum())
        words = _next_words(logits, owner, choice, draws, finished, kernels)
        assert (words == _next_words(logits, owner, choice, draws, finished, None)).all()
        assert not np.isin(words[~finished], [1, 4]).any() and (words[finished] == EOS).all()
        done = finished | (words == EOS)
        compiled = _distinct(owner, words, done, vocab, kernels)
        for got, expected in zip(compiled, _distinct(owner, words, done, vocab, None)):
            np.testing.assert_array_equal(got, expected)


def test_the_kth_smallest_by_quickselect_is_numpys():
    import numba

    from model.decoding_kernels import _kth_smallest

    kth_smallest = numba.njit(_kth_smallest)
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 12, 41, 1000):
        for _ in range(20):
            values = np.round(rng.standard_normal(size), 1).astype(np.float32)  # with ties
            values[rng.random(size) < 0.1] = -np.inf  # never-written words
            k = int(rng.integers(0, size))
            assert kth_smallest(values.copy(), k) == np.partition(values, k)[k]


@pytest.mark.usefixtures("numba_that_cannot_compile")
def test_decoding_kernels_that_fail_to_compile_leave_the_work_to_numpy(caplog):
    from model import decoding

    assert decoding.compiled_kernels.__wrapped__() is None
    assert "decoding: numba kernels unavailable, numpy instead: TypingError" in caplog.text


def test_the_bundled_attention_decoder_writes_alike_compiled_or_in_numpy():
    """Greedy captions and seeded samples of 48 held-out scenes: the same words either way."""
    from model.captioner import Captioner
    from model.data.scenes import render_scene
    from model.decoding import Tables

    captioner = Captioner.load()
    compiled = captioner.runtimes["attention"]
    numpy = runtime(Tables(compiled.config, compiled.a), compiled=False, int8=True)
    bos, eos = captioner.vocab.bos, captioner.vocab.eos
    grid = captioner._stack(captioner.encode([render_scene(31_000_000 + s)[1] for s in range(48)]))
    rows = np.repeat(np.arange(48), 4)
    greedy_rows = np.arange(len(rows)) % 4 == 0  # a greedy caption and 3 samples per scene

    def written(steps):
        rng = np.random.default_rng(0)
        return decode(steps, grid, bos, eos, greedy=greedy_rows, rng=rng, rows=rows)[0]

    expected = written(numpy)
    assert len({tuple(ids) for ids in expected}) > 40
    assert written(compiled) == expected
