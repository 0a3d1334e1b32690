"""InferenceWorker: batching, error isolation, ordering, cache, drain on shutdown.

A small captioner double records every call, and can hold the inference thread on a
gate so that jobs pile up in the queue deterministically (no timing guesses).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from bot.worker import (
    AttentionResult,
    BadImage,
    CaptionResult,
    EncodedCache,
    InferenceFailed,
    InferenceWorker,
    NotCached,
    PhotoInput,
    QueueFull,
    WorkerStopped,
)

pytestmark = pytest.mark.timeout(30)


class FakeImageError(ValueError):
    pass


@dataclass
class FakeCaption:
    text: str
    tokens: list[str]
    alphas: list | None


@dataclass(frozen=True)
class FakeVerdict:
    in_domain: bool
    score: float
    threshold: float = 1.0


@dataclass(frozen=True)
class FakeLabel:
    label: str
    p: float


@dataclass(frozen=True)
class FakeCaptions:
    attention: FakeCaption
    baseline: FakeCaption
    samples: list[str]


class FakeCaptioner:
    """Images are strings; a caption names its image so mix-ups are visible. Images whose
    name starts with "photo" are outside the domain; their labels name them too."""

    def __init__(self) -> None:
        self.encode_batches: list[list[str]] = []
        self.greedy_calls: list[tuple[str, int]] = []
        self.sample_calls: list[tuple[int, float, int]] = []
        self.captions_calls: list[tuple[int, float, int]] = []
        self.domain_calls: list[int] = []
        self.label_calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.decode_gate = threading.Event()  # holds `captions`, as `gate` holds `encode`
        self.decode_gate.set()
        self.entered = threading.Event()

    def encode(self, images):
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        if any(image == "poison" for image in images):
            raise RuntimeError("encoder exploded")
        self.encode_batches.append(list(images))
        return [f"enc({image})" for image in images]

    @staticmethod
    def _greedy(e, decoder):
        alphas = [[[1.0]], [[1.0]]] if decoder == "attention" else None
        return FakeCaption(f"{decoder} {e}", [decoder, e], alphas)

    @staticmethod
    def _samples(e, n, temperature):
        return [f"sample{i} {e} t={temperature}" for i in range(n)]

    def greedy(self, encoded, decoder):
        self.greedy_calls.append((decoder, len(encoded)))
        return [self._greedy(e, decoder) for e in encoded]

    def sample(self, encoded, n, *, decoder="attention", temperature=1.0):
        self.sample_calls.append((n, temperature, len(encoded)))
        return [self._samples(e, n, temperature) for e in encoded]

    def captions(self, encoded, n_samples=0, *, temperature=1.0):
        """As the real one: both greedy captions and the samples of each image in one call."""
        assert self.decode_gate.wait(10), "test decode gate never opened"
        self.captions_calls.append((n_samples, temperature, len(encoded)))
        return [
            FakeCaptions(
                self._greedy(e, "attention"),
                self._greedy(e, "baseline"),
                self._samples(e, n_samples, temperature),
            )
            for e in encoded
        ]

    def domain(self, encoded):
        self.domain_calls.append(len(encoded))
        return [
            FakeVerdict(not e.startswith("enc(photo"), 2.0 if e.startswith("enc(photo") else 0.5)
            for e in encoded
        ]

    def imagenet_labels(self, encoded, k=5):
        self.label_calls.append(list(encoded))
        return [[FakeLabel(f"label{i} {e}", 0.5 / (i + 1)) for i in range(k)] for e in encoded]


def fake_open(data: bytes, max_pixels: int) -> str:
    if data == b"corrupt":
        raise FakeImageError("the image is corrupt or truncated")
    return data.decode()


def fake_figure(image, tokens, alphas) -> bytes:
    return f"JPEG {image} {' '.join(tokens)}".encode()


@pytest.fixture
def make_worker(stop_at_end):
    """Builds a worker on the fakes; each one is stopped when the test ends."""

    def make(captioner: FakeCaptioner, **kwargs) -> InferenceWorker:
        options = dict(queue_max=100, batch_max=8, batch_wait_ms=5, cache_size=16)
        options.update(kwargs)
        return stop_at_end(
            InferenceWorker(
                captioner,
                open_image=fake_open,
                attention_figure=fake_figure,
                image_errors=(FakeImageError,),
                **options,
            )
        )

    return make


def photo(name: str, data: bool = True) -> PhotoInput:
    return PhotoInput(key=name, data=name.encode() if data else None)


async def hold_first_batch(worker: InferenceWorker, captioner: FakeCaptioner) -> asyncio.Task:
    """Start one job and keep the inference thread busy with it until the gate opens."""
    captioner.gate.clear()
    captioner.entered.clear()
    first = asyncio.create_task(worker.caption(photo("first"), n_samples=1))
    assert await asyncio.to_thread(captioner.entered.wait, 5)
    return first


async def test_jobs_waiting_together_share_one_encoder_call(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_max=8)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    jobs = [asyncio.create_task(worker.caption(photo(f"img{i}"), n_samples=2)) for i in range(10)]
    await asyncio.sleep(0.05)  # let every submit reach the queue
    captioner.gate.set()
    results = await asyncio.gather(first, *jobs)

    assert [len(batch) for batch in captioner.encode_batches] == [1, 8, 2]
    # Decoders run once per batch too: one `captions` call (both greedy captions + samples).
    assert captioner.captions_calls == [(1, 1.0, 1), (2, 1.0, 8), (2, 1.0, 2)]
    assert captioner.greedy_calls == [] and captioner.sample_calls == []
    for i, result in enumerate(results[1:]):
        assert isinstance(result, CaptionResult)
        assert result.headline == f"attention enc(img{i})"
        assert result.baseline == f"baseline enc(img{i})"
        assert result.samples == [f"sample{k} enc(img{i}) t=1.0" for k in range(2)]


async def test_the_next_batch_is_encoded_while_the_previous_one_decodes(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    captioner.decode_gate.clear()
    first = asyncio.create_task(worker.caption(photo("first"), n_samples=0))
    second = asyncio.create_task(worker.caption(photo("second"), n_samples=0))
    await asyncio.sleep(0.05)
    third = asyncio.create_task(worker.caption(photo("third"), n_samples=0))
    for _ in range(100):  # the third's encoding does not wait for the first batch's decoding
        if len(captioner.encode_batches) == 2:
            break
        await asyncio.sleep(0.01)
    assert captioner.encode_batches == [["first", "second"], ["third"]]
    assert captioner.captions_calls == [] and not first.done()
    captioner.decode_gate.set()
    results = await asyncio.gather(first, second, third)
    assert [r.headline for r in results] == [
        f"attention enc({n})" for n in ("first", "second", "third")
    ]
    assert captioner.captions_calls == [(0, 1.0, 2), (0, 1.0, 1)]


async def test_jobs_run_in_submission_order_and_each_gets_its_own_result(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_max=3)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    names = [f"p{i}" for i in range(7)]
    kinds = ["samples", "caption", "attention"]
    tasks = []
    for i, name in enumerate(names):
        kind = kinds[i % 3]
        if kind == "samples":
            tasks.append(asyncio.create_task(worker.samples(photo(name), n=i + 1, temperature=0.5)))
        elif kind == "caption":
            tasks.append(asyncio.create_task(worker.caption(photo(name), n_samples=0)))
        else:
            tasks.append(asyncio.create_task(worker.attention(photo(name))))
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    results = await asyncio.gather(*tasks)

    encoded_order = [image for batch in captioner.encode_batches[1:] for image in batch]
    assert encoded_order == names
    for i, (name, result) in enumerate(zip(names, results)):
        kind = kinds[i % 3]
        if kind == "samples":
            assert result.samples == [f"sample{k} enc({name}) t=0.5" for k in range(i + 1)]
        elif kind == "caption":
            assert result.headline == f"attention enc({name})" and result.samples == []
        else:
            assert isinstance(result, AttentionResult)
            assert result.words == 2
            assert result.figure == f"JPEG {name} attention enc({name})".encode()


async def test_a_failing_job_fails_alone_and_the_worker_keeps_going(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    good1 = asyncio.create_task(worker.caption(photo("good1"), n_samples=1))
    corrupt = asyncio.create_task(worker.caption(PhotoInput("c", b"corrupt"), n_samples=1))
    poison = asyncio.create_task(worker.samples(photo("poison"), n=2))
    good2 = asyncio.create_task(worker.attention(photo("good2")))
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    results = await asyncio.gather(good1, corrupt, poison, good2, return_exceptions=True)

    assert results[0].headline == "attention enc(good1)"
    assert (
        isinstance(results[1], BadImage) and str(results[1]) == "the image is corrupt or truncated"
    )
    assert isinstance(results[2], InferenceFailed)
    assert isinstance(results[3], AttentionResult)
    # The batch was encoded together first (and failed on the poison), then job by job.
    assert ["good1", "good2"] in captioner.encode_batches or (
        ["good1"] in captioner.encode_batches and ["good2"] in captioner.encode_batches
    )
    # Still serving afterwards.
    after = await worker.caption(photo("later"), n_samples=1)
    assert after.headline == "attention enc(later)"


async def test_a_decoder_failure_in_a_batch_only_fails_that_job(make_worker):
    captioner = FakeCaptioner()
    original = captioner.sample

    def picky_sample(encoded, n, *, decoder="attention", temperature=1.0):
        if "enc(bad)" in encoded:
            raise RuntimeError("sampler exploded")
        return original(encoded, n, decoder=decoder, temperature=temperature)

    captioner.sample = picky_sample
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    tasks = [asyncio.create_task(worker.samples(photo(name), n=2)) for name in ("a", "bad", "b")]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    a, bad, b = await asyncio.gather(*tasks, return_exceptions=True)
    assert a.samples == ["sample0 enc(a) t=1.0", "sample1 enc(a) t=1.0"]
    assert isinstance(bad, InferenceFailed)
    assert b.samples == ["sample0 enc(b) t=1.0", "sample1 enc(b) t=1.0"]


async def test_samples_with_different_settings_in_one_batch_are_grouped(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    tasks = [
        asyncio.create_task(worker.samples(photo("a"), n=3, temperature=0.7)),
        asyncio.create_task(worker.samples(photo("b"), n=3, temperature=0.7)),
        asyncio.create_task(worker.samples(photo("c"), n=5, temperature=1.5)),
    ]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    await asyncio.gather(*tasks)
    assert sorted(captioner.sample_calls) == [(3, 0.7, 2), (5, 1.5, 1)]


async def test_a_lone_job_on_an_idle_worker_starts_without_waiting_for_the_window(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_wait_ms=400)
    await worker.start()
    one = asyncio.create_task(worker.caption(photo("one"), n_samples=1))
    await asyncio.sleep(0.05)
    two = asyncio.create_task(worker.caption(photo("two"), n_samples=1))
    await asyncio.wait_for(asyncio.gather(one, two), 0.3)  # well inside one window
    assert captioner.encode_batches == [["one"], ["two"]]


async def test_jobs_queuing_behind_a_busy_worker_wait_for_the_window_to_fill(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_wait_ms=400)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    queued = [asyncio.create_task(worker.caption(photo(n), n_samples=1)) for n in ("a", "b")]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    await asyncio.sleep(0.05)  # the worker now holds a and b, waiting for the window
    late = asyncio.create_task(worker.caption(photo("c"), n_samples=1))
    await asyncio.gather(*queued, late)
    assert captioner.encode_batches == [["first"], ["a", "b", "c"]]


async def test_batching_off_runs_one_job_per_batch(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_max=1)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    tasks = [asyncio.create_task(worker.caption(photo(f"x{i}"), n_samples=1)) for i in range(3)]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await asyncio.gather(first, *tasks)
    assert [len(batch) for batch in captioner.encode_batches] == [1, 1, 1, 1]


async def test_encoded_photos_are_cached_by_key_and_reused_without_bytes(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, cache_size=2)
    await worker.start()
    await worker.caption(photo("a"), n_samples=1)
    assert await worker.is_cached("a")
    samples = await worker.samples(photo("a", data=False), n=2)
    figure = await worker.attention(photo("a", data=False))
    assert samples.samples == ["sample0 enc(a) t=1.0", "sample1 enc(a) t=1.0"]
    assert figure.figure.startswith(b"JPEG a")
    assert captioner.encode_batches == [["a"]]  # encoded once

    with pytest.raises(NotCached):
        await worker.samples(photo("never-seen", data=False), n=1)
    # LRU: "a" was used last, so adding b and c evicts b... then a is older than c.
    await worker.caption(photo("b"), n_samples=0)
    await worker.samples(photo("a", data=False), n=1)
    await worker.caption(photo("c"), n_samples=0)
    assert await worker.is_cached("a") and await worker.is_cached("c")
    assert not await worker.is_cached("b")


class AskingCache(EncodedCache):
    """A cache that records each lookup beyond the local entries (a shared cache's GET)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.asked: list[str] = []

    def get(self, key: str):
        self.asked.append(key)
        return super().get(key)


async def test_a_photo_with_its_bytes_is_never_looked_up_beyond_the_local_cache(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    worker.cache = AskingCache(16)
    await worker.start()
    await worker.caption(photo("a"), n_samples=1)
    await worker.caption(photo("a"), n_samples=1)  # the local entry, still no lookup
    assert worker.cache.asked == []
    assert captioner.encode_batches == [["a"]]
    await worker.samples(photo("a", data=False), n=1)  # no bytes: the shared cache may have it
    assert worker.cache.asked == ["a"]


async def test_a_full_queue_is_refused_at_once(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, queue_max=2)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    queued = [asyncio.create_task(worker.caption(photo(f"q{i}"), n_samples=1)) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull):
        await worker.caption(photo("one-too-many"), n_samples=1)
    captioner.gate.set()
    await asyncio.gather(first, *queued)


async def test_the_event_loop_keeps_running_while_the_model_works(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    started = time.perf_counter()
    await asyncio.sleep(0.01)
    assert time.perf_counter() - started < 0.5  # the blocked model thread doesn't block us
    captioner.gate.set()
    await first


async def test_stop_finishes_accepted_jobs_then_refuses_new_ones(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, batch_max=2)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    queued = [asyncio.create_task(worker.caption(photo(f"d{i}"), n_samples=1)) for i in range(5)]
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(worker.stop(timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(WorkerStopped):
        await worker.caption(photo("late"), n_samples=1)
    captioner.gate.set()
    await stopping
    results = await asyncio.gather(first, *queued)
    assert [r.headline for r in results[1:]] == [f"attention enc(d{i})" for i in range(5)]
    assert not worker.running


async def test_stop_past_its_timeout_fails_leftover_jobs_instead_of_hanging(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    queued = asyncio.create_task(worker.caption(photo("never-run"), n_samples=1))
    await asyncio.sleep(0.05)
    await worker.stop(timeout=0.2)
    with pytest.raises(WorkerStopped):
        await queued
    with pytest.raises(WorkerStopped):
        await first  # in flight in the thread when time ran out
    captioner.gate.set()


async def test_worker_log_lines_carry_the_submitting_updates_context(make_worker, monkeypatch):
    """`job`, `job_failed` and `batch_failed` are logged from the worker's task and thread,
    outside the update's context; the job carries it there."""
    import structlog.testing

    worker = make_worker(FakeCaptioner(), batch_max=1)
    await worker.start()

    async def submit(update_id: int, name: str):
        with structlog.contextvars.bound_contextvars(
            update_id=update_id, user_id=update_id + 1000, chat_id=update_id + 2000
        ):
            return await worker.caption(photo(name), n_samples=0, chat_id=update_id + 2000)

    with structlog.testing.capture_logs() as logs:
        await submit(1, "ok")
        with pytest.raises(InferenceFailed):
            await submit(2, "poison")
        monkeypatch.setattr(worker, "_back", lambda jobs: 1 / 0)
        with pytest.raises(InferenceFailed):
            await submit(3, "ok")
    lines = {(line["event"], line.get("update_id")): line for line in logs}
    for event, update_id in (
        ("job", 1),
        ("job_failed", 2),
        ("job", 2),
        ("batch_failed", 3),
        ("job", 3),
    ):
        line = lines.get((event, update_id))
        assert line is not None, (event, update_id, logs)
        assert line["user_id"] == update_id + 1000 and line["chat_id"] == update_id + 2000, line


# ---- the domain check ------------------------------------------------------------------------


async def test_a_photo_outside_the_domain_gets_labels_instead_of_captions(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    tasks = [
        asyncio.create_task(worker.caption(photo(name), n_samples=2))
        for name in ("scene", "photo-cat")
    ]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    scene, cat = await asyncio.gather(*tasks)

    assert scene.captioned and not scene.out_of_domain and scene.labels is None
    assert scene.headline == "attention enc(scene)" and len(scene.samples) == 2
    assert not cat.captioned and cat.out_of_domain
    assert cat.verdict.score == 2.0
    assert [label.label for label in cat.labels] == [f"label{i} enc(photo-cat)" for i in range(3)]
    # One domain call for the batch; labels only for the photo, decoders only for the scene.
    assert captioner.domain_calls[1:] == [2]
    assert captioner.label_calls == [["enc(photo-cat)"]]
    assert captioner.captions_calls[1:] == [(2, 1.0, 1)]
    assert captioner.greedy_calls == [] and captioner.sample_calls == []


async def test_caption_anyway_samples_and_attention_run_the_decoders_and_carry_the_verdict(
    make_worker,
):
    captioner = FakeCaptioner()
    worker = make_worker(captioner)
    await worker.start()
    labelled = await worker.caption(photo("photo-cat"), n_samples=1)
    anyway = await worker.caption(photo("photo-cat", data=False), n_samples=2, anyway=True)
    samples = await worker.samples(photo("photo-cat", data=False), n=3)
    figure = await worker.attention(photo("photo-cat", data=False))

    assert not labelled.captioned
    assert anyway.captioned and anyway.out_of_domain and anyway.labels is None
    assert anyway.headline == "attention enc(photo-cat)" and len(anyway.samples) == 2
    assert samples.out_of_domain and len(samples.samples) == 3
    assert figure.out_of_domain and figure.caption == "attention enc(photo-cat)"
    assert captioner.encode_batches == [["photo-cat"]]  # the rest came from the cache
    assert len(captioner.label_calls) == 1


async def test_with_the_domain_check_off_every_photo_is_captioned(make_worker):
    captioner = FakeCaptioner()
    worker = make_worker(captioner, domain_check=False)
    await worker.start()
    result = await worker.caption(photo("photo-cat"), n_samples=1)
    assert result.captioned and result.verdict is None and not result.out_of_domain
    assert result.headline == "attention enc(photo-cat)"
    assert captioner.domain_calls == [] and captioner.label_calls == []


async def test_a_failing_domain_check_fails_only_its_job(make_worker):
    captioner = FakeCaptioner()
    original = captioner.domain

    def picky_domain(encoded):
        if "enc(bad)" in encoded:
            raise RuntimeError("domain check exploded")
        return original(encoded)

    captioner.domain = picky_domain
    worker = make_worker(captioner)
    await worker.start()
    first = await hold_first_batch(worker, captioner)
    tasks = [asyncio.create_task(worker.caption(photo(name), n_samples=1)) for name in ("a", "bad")]
    await asyncio.sleep(0.05)
    captioner.gate.set()
    await first
    a, bad = await asyncio.gather(*tasks, return_exceptions=True)
    assert a.headline == "attention enc(a)"
    assert isinstance(bad, InferenceFailed)


async def test_starting_the_bot_worker_hands_the_gil_over_sooner(make_worker):
    """The worker's threads take the GIL back after every ONNX Runtime or numba call; the bot
    shortens CPython's switch interval so that they wait less for the event loop's Python."""
    from bot.app import GIL_SWITCH_INTERVAL_S, start_worker

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        worker = make_worker(FakeCaptioner())
        await start_worker(worker)
        assert worker.running
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert GIL_SWITCH_INTERVAL_S < 0.005
    finally:
        sys.setswitchinterval(before)
        gc.unfreeze()  # start_worker froze the heap, as the bot does once its model has loaded
