"""Decoding algorithms against the teacher-forced pass, on randomly initialised decoders."""

import pytest
import torch

from model.decoders import DecoderConfig, beam_search, build_decoder, sample

BOS, EOS, VOCAB = 1, 2, 30


def make(kind, seed=0):
    torch.manual_seed(seed)
    decoder = build_decoder(
        DecoderConfig(
            kind=kind,
            vocab_size=VOCAB,
            feature_dim=40,
            num_cells=49,
            embed_dim=16,
            hidden_dim=32,
            attention_dim=24,
            cell_dim=32,
            layout_dim=4,
        )
    )
    # Bias the output layer so that captions end within a few words, as a trained decoder's do.
    with torch.no_grad():
        decoder.fc.bias[EOS] += 1.5
    return decoder.eval()


def grids(batch=3, seed=1):
    return torch.randn(batch, 49, 40, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_incremental_steps_equal_teacher_forced_pass(kind):
    decoder, grid = make(kind), grids()
    inputs = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    inputs[:, 0] = BOS
    with torch.no_grad():
        full_logits, full_alphas = decoder(grid, inputs)
        state, step_logits, step_alphas = decoder.start(grid), [], []
        for t in range(inputs.shape[1]):
            logits, state, alpha = decoder.step(inputs[:, t], state)
            step_logits.append(logits)
            step_alphas.append(alpha)
    torch.testing.assert_close(torch.stack(step_logits, 1), full_logits, rtol=1e-5, atol=1e-5)
    if kind == "attention":
        torch.testing.assert_close(torch.stack(step_alphas, 1), full_alphas)
        assert torch.allclose(full_alphas.sum(-1), torch.ones(3, 7))  # a distribution over cells
    else:
        assert full_alphas is None and step_alphas[0] is None


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_beam_of_width_one_is_greedy(kind):
    decoder, grid = make(kind), grids(5)
    greedy_ids, greedy_alphas = sample(decoder, grid, BOS, EOS, greedy=True)
    beam_ids, beam_alphas = beam_search(decoder, grid, BOS, EOS, width=1)
    assert beam_ids == greedy_ids
    if kind == "attention":
        for a, b in zip(beam_alphas, greedy_alphas):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_sampling_near_zero_temperature_is_greedy(kind):
    decoder, grid = make(kind), grids(4)
    greedy_ids, _ = sample(decoder, grid, BOS, EOS, greedy=True)
    cold_ids, _ = sample(
        decoder, grid, BOS, EOS, temperature=1e-4, generator=torch.Generator().manual_seed(0)
    )
    assert cold_ids == greedy_ids


def test_batched_greedy_equals_one_image_at_a_time():
    decoder, grid = make("attention"), grids(4)
    together, _ = sample(decoder, grid, BOS, EOS, greedy=True)
    alone = [sample(decoder, grid[i : i + 1], BOS, EOS, greedy=True)[0][0] for i in range(4)]
    assert together == alone


def test_samples_of_one_image_decode_in_one_batch_and_vary():
    decoder = make("attention")
    grid = grids(1).repeat(16, 1, 1)
    ids, alphas = sample(
        decoder, grid, BOS, EOS, temperature=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert len(ids) == 16 and len({tuple(i) for i in ids}) > 1
    assert all(EOS not in i and BOS not in i for i in ids)
    assert all(a.shape == (len(i), 49) for i, a in zip(ids, alphas))


@pytest.mark.parametrize("kind", ["baseline", "attention"])
def test_starting_once_per_image_equals_repeating_its_grid(kind):
    decoder, grid = make(kind), grids(2)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])
    repeated, _ = sample(
        decoder, grid[rows], BOS, EOS, temperature=1.5, generator=torch.Generator().manual_seed(4)
    )
    started_once, _ = sample(
        decoder,
        grid,
        BOS,
        EOS,
        temperature=1.5,
        generator=torch.Generator().manual_seed(4),
        rows=rows,
    )
    assert started_once == repeated


def test_greedy_captions_and_samples_decode_together_as_they_would_apart():
    decoder, grid = make("attention"), grids(2)
    greedy_ids, greedy_alphas = sample(decoder, grid, BOS, EOS, greedy=True)
    sample_rows = torch.tensor([0, 0, 0, 1, 1, 1])
    sample_ids, _ = sample(
        decoder,
        grid,
        BOS,
        EOS,
        temperature=1.5,
        generator=torch.Generator().manual_seed(4),
        rows=sample_rows,
    )
    rows = torch.cat([torch.arange(2), sample_rows])
    ids, alphas = sample(
        decoder,
        grid,
        BOS,
        EOS,
        temperature=1.5,
        generator=torch.Generator().manual_seed(4),
        rows=rows,
        greedy=torch.arange(len(rows)) < 2,
    )
    assert ids[:2] == greedy_ids and ids[2:] == sample_ids
    for a, b in zip(alphas[:2], greedy_alphas):
        torch.testing.assert_close(a, b)


def test_captioner_captions_equal_its_separate_calls():
    from model.captioner import Captioner
    from model.data.scenes import render_scene

    captioner = Captioner.untrained(seed=3)
    with torch.no_grad():
        for decoder in captioner.decoders.values():  # random decoders: end captions early
            decoder.fc.bias[captioner.vocab.eos] += 2.0
    encoded = captioner.encode([render_scene(seed)[1] for seed in range(3)])
    together = captioner.captions(encoded, 4, temperature=1.3, seed=9)
    headlines = captioner.greedy(encoded, "attention")
    assert [c.attention.tokens for c in together] == [c.tokens for c in headlines]
    torch.testing.assert_close(
        [c.attention.alphas for c in together], [c.alphas for c in headlines]
    )
    assert [c.baseline.text for c in together] == [
        c.text for c in captioner.greedy(encoded, "baseline")
    ]
    assert [c.samples for c in together] == captioner.sample(encoded, 4, temperature=1.3, seed=9)
    assert captioner.captions([], 4) == []


def test_top_k_one_is_greedy():
    decoder, grid = make("baseline"), grids(4)
    greedy_ids, _ = sample(decoder, grid, BOS, EOS, greedy=True)
    top1_ids, _ = sample(decoder, grid, BOS, EOS, temperature=2.0, top_k=1)
    assert top1_ids == greedy_ids


def test_beam_search_finds_a_caption_at_least_as_likely_as_greedy():
    decoder, grid = make("attention", seed=3), grids(4, seed=5)

    def log_prob(row, ids):
        state, total = decoder.start(grid[row : row + 1]), 0.0
        for prev, word in zip([BOS] + ids, ids + [EOS]):
            logits, state, _ = decoder.step(torch.tensor([prev]), state)
            total += logits.log_softmax(1)[0, word].item()
        return total

    with torch.no_grad():
        greedy_ids, _ = sample(decoder, grid, BOS, EOS, greedy=True)
        beam_ids, _ = beam_search(decoder, grid, BOS, EOS, width=4)
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
    decoder = make("attention")
    grid = torch.zeros(1, 49, 40)
    grid[0, 3], grid[0, 45] = 1.0, -1.0
    swapped = grid.clone()
    swapped[0, 3], swapped[0, 45] = grid[0, 45], grid[0, 3]
    words = torch.tensor([BOS])
    with torch.no_grad():
        logits, _, alpha = decoder.step(words, decoder.start(grid))
        logits_swapped, _, alpha_swapped = decoder.step(words, decoder.start(swapped))
    followed = alpha.clone()
    followed[0, 3], followed[0, 45] = alpha[0, 45], alpha[0, 3]
    assert not torch.allclose(alpha_swapped, followed, atol=1e-4)
    assert not torch.allclose(logits, logits_swapped, atol=1e-6)


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
    words = torch.tensor([BOS, BOS])
    with torch.no_grad():
        fine_logits, _, _ = fine.step(words, fine.start(grid))
        coarse_logits, _, _ = coarse.step(words, coarse.start(pooled))
    torch.testing.assert_close(fine_logits, coarse_logits, rtol=1e-5, atol=1e-5)


def test_attention_remembers_where_it_has_looked():
    # The state carries the last attention map and their running sum; the next map depends on
    # them, so that a colour word and its shape word stay on one object and a described object
    # is not described again.
    decoder, grid = make("attention"), grids(batch=1)
    words = torch.tensor([BOS])
    with torch.no_grad():
        state = decoder.start(grid)
        maps = []
        for word in (BOS, 5, 7):
            _, state, alpha = decoder.step(torch.tensor([word]), state)
            maps.append(alpha)
        assert torch.allclose(state["coverage"], sum(maps))
        assert torch.equal(state["alpha"], maps[-1])

        fresh = decoder.start(grid)
        _, _, alpha_fresh = decoder.step(words, fresh)
        looked = {**fresh, "alpha": maps[0], "coverage": maps[0]}
        _, _, alpha_looked = decoder.step(words, looked)
    assert not torch.allclose(alpha_fresh, alpha_looked, atol=1e-5)


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
