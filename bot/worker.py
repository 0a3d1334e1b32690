"""The inference worker: the only part of the bot that touches the captioning model.

Handlers submit jobs and await their results; one background task takes jobs off a
bounded queue in micro-batches (up to `batch_max`; when jobs are queuing, waiting at most
`batch_wait_ms` for the batch to fill; a lone job starts at once) and runs each batch in a
single dedicated thread, so the event loop keeps polling and replying while the model works.
Per batch the encoder runs once on every image that is not cached yet, the domain check once
on every job's encoding, then each decoder runs once on the jobs that need it. A photo unlike
the scenes the decoders were trained on (with the domain check on) is not captioned unless
asked (`anyway`): it gets the ImageNet labels of what the encoder sees instead. When a batched
call fails, the same call is repeated job by job so that only the job that caused the failure
fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from bot.log import get_logger
from bot.model_host import StartupError as StartupError  # raised by load; the app reports it
from bot.model_host import load_captioner

if TYPE_CHECKING:
    from bot.settings import Settings

log = get_logger("bot.worker")

# Test hook (the journal's tests): a worker started with this set takes its first batch and
# holds it, logging `test_holding_jobs`, until the process is killed or stops.
HOLD_JOBS_ENV = "CAPTIONBOT_TEST_HOLD_JOBS"

# Thumbnails kept beside encoder outputs for /attention figures; the figure draws small
# tiles, so the full-size photo isn't needed once it has been encoded.
THUMBNAIL_SIDE = 384


# ---- errors a handler can meet (each has a user-facing meaning) -----------------------


class WorkerError(Exception):
    """Base class of errors the worker reports to handlers."""


class QueueFull(WorkerError):
    """The bounded queue is full: ask the user to retry shortly."""


class WorkerStopped(WorkerError):
    """The worker is shutting down and did not run (or finish) the job."""


class NotCached(WorkerError):
    """The job named a photo by key only, and its encoding is not (or no longer) cached."""


class BadImage(WorkerError):
    """The bytes are not a usable image; str() is a short user-facing reason."""


class InferenceFailed(WorkerError):
    """The model failed on this job for an unexpected reason (logged with a traceback)."""


# ---- what handlers pass in and get back ----------------------------------------------


@dataclass(frozen=True)
class PhotoInput:
    """A photo identified by Telegram's `file_unique_id`, with its bytes when downloaded.

    `data=None` asks the worker to use the cached encoding; it raises `NotCached` if
    the photo is not in the cache, and the handler then downloads and resubmits.
    """

    key: str
    data: bytes | None = None


def _outside(verdict: Any) -> bool:
    return verdict is not None and not verdict.in_domain


@dataclass(frozen=True)
class CaptionResult:
    headline: str  # attention decoder, greedy ("" when not captioned)
    baseline: str  # baseline decoder, greedy
    samples: list[str]
    verdict: Any = None  # the captioner's DomainVerdict; None with the domain check off
    labels: list[Any] | None = None  # ImageNet Labels, instead of captions (out of domain)

    @property
    def captioned(self) -> bool:
        return self.labels is None

    @property
    def out_of_domain(self) -> bool:
        return _outside(self.verdict)


@dataclass(frozen=True)
class SamplesResult:
    samples: list[str]
    verdict: Any = None

    @property
    def out_of_domain(self) -> bool:
        return _outside(self.verdict)


@dataclass(frozen=True)
class AttentionResult:
    caption: str
    words: int  # tiles in the figure besides the photo itself
    figure: bytes  # JPEG
    verdict: Any = None

    @property
    def out_of_domain(self) -> bool:
        return _outside(self.verdict)


class CaptionerLike(Protocol):
    """What the worker needs from `model.captioner.Captioner` (tests pass a double)."""

    def encode(self, images: Sequence[Any]) -> list[Any]: ...
    def greedy(self, encoded: Sequence[Any], decoder: str) -> list[Any]: ...
    def sample(
        self, encoded: Sequence[Any], n: int, *, decoder: str = ..., temperature: float = ...
    ) -> list[list[str]]: ...
    def captions(
        self, encoded: Sequence[Any], n_samples: int = ..., *, temperature: float = ...
    ) -> list[Any]: ...  # Captions(attention, baseline, samples) per encoding
    def domain(self, encoded: Sequence[Any]) -> list[Any]: ...  # DomainVerdict per encoding
    def imagenet_labels(self, encoded: Sequence[Any], k: int = ...) -> list[list[Any]]: ...


# ---- internals -----------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "caption" | "samples" | "attention"
    photo: PhotoInput
    n: int = 0
    temperature: float = 1.0
    chat_id: int | None = None
    message_id: int | None = None
    anyway: bool = False  # caption even if the photo is outside the decoders' domain
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    enqueued_at: float = field(default_factory=time.perf_counter)
    # The submitting update's log context (update_id, user_id, ...): the worker's lines
    # are logged outside it, from its own task and thread.
    context: dict[str, Any] = field(default_factory=structlog.contextvars.get_contextvars)
    # Filled in the worker thread:
    image: Any = None
    encoded: Any = None
    thumbnail: Any = None
    from_cache: bool = False
    greedy: dict[str, Any] = field(default_factory=dict)  # decoder name -> its caption
    samples: list[str] | None = None
    verdict: Any = None  # the domain check's DomainVerdict (None when it is off)
    labels: list[Any] | None = None  # ImageNet labels, for a caption job not captioned
    error: WorkerError | None = None  # set by the first stage that fails; later ones skip it

    def where(self) -> dict[str, Any]:
        """What its log lines carry: its update's context, the chat and message it answers."""
        return {**self.context, "chat_id": self.chat_id, "message_id": self.message_id}


# ImageNet labels an out-of-domain photo's reply gives.
LABELS_K = 3


def _alive(jobs: Iterable[_Job]) -> list[_Job]:
    return [job for job in jobs if job.error is None]


def _by_sampling(jobs: Iterable[_Job]) -> dict[tuple[int, float], list[_Job]]:
    """The live jobs grouped by their (n, temperature): each group decodes as one batch."""
    groups: dict[tuple[int, float], list[_Job]] = {}
    for job in _alive(jobs):
        groups.setdefault((job.n, job.temperature), []).append(job)
    return groups


def _labels_only(job: _Job) -> bool:
    """A caption job for a photo outside the domain, not asked to caption anyway: it gets
    ImageNet labels instead of captions."""
    return job.kind == "caption" and not job.anyway and _outside(job.verdict)


@dataclass
class _CacheEntry:
    encoded: Any
    thumbnail: Any


class EncodedCache:
    """LRU of encoder outputs (plus a thumbnail) keyed by Telegram `file_unique_id`.

    Read from the event loop (`__contains__`) and written from the worker thread.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    async def holds(self, key: str) -> bool:
        """`key in self`, for the event loop: a cache that asks elsewhere does so off it."""
        return key in self

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: str) -> _CacheEntry | None:
        return self.get_local(key)

    def get_local(self, key: str) -> _CacheEntry | None:
        """This process's entry only (a shared cache never asks elsewhere here)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: _CacheEntry, source: bytes | None = None) -> None:
        """`source`: the photo's bytes, for a cache that stores the entry elsewhere too."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


def _default_open_image(data: bytes, max_pixels: int) -> Any:
    from model.images import open_image

    return open_image(data, max_pixels=max_pixels)


def _default_figure(image: Any, tokens: list[str], alphas: Any) -> bytes:
    from model.figure import attention_figure

    return attention_figure(image, tokens, alphas)


def _image_error_types() -> tuple[type[BaseException], ...]:
    try:
        from model.images import ImageError
    except ImportError:  # the model package is optional for worker unit tests
        return ()
    return (ImageError,)


class InferenceWorker:
    def __init__(
        self,
        captioner: CaptionerLike,
        *,
        queue_max: int = 100,
        batch_max: int = 16,
        batch_wait_ms: float = 10,
        cache_size: int = 128,
        max_image_pixels: int = 40_000_000,
        open_image: Callable[[bytes, int], Any] = _default_open_image,
        attention_figure: Callable[[Any, list[str], Any], bytes] = _default_figure,
        image_errors: tuple[type[BaseException], ...] | None = None,
        domain_check: bool = True,
    ) -> None:
        self._captioner = captioner
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_max)
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_ms / 1000
        self.cache = EncodedCache(cache_size)
        self._max_image_pixels = max_image_pixels
        self._open_image = open_image
        self._attention_figure = attention_figure
        self._image_errors = _image_error_types() if image_errors is None else image_errors
        self.domain_check = domain_check
        # Two stages, one thread each, so that one batch's encoding overlaps the previous
        # batch's decoding on a second core: each stage handles one batch at a time, in order.
        self._encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._in_flight: list[_Job] = []
        self._hold = bool(os.environ.get(HOLD_JOBS_ENV))
        self.batches_run = 0
        self.jobs_done = 0

    @classmethod
    async def load(cls, settings: Settings) -> InferenceWorker:
        """The bot's worker: loads the captioner `settings` name (CAPTIONER, WEIGHTS_DIR,
        DEVICE, INFERENCE_THREADS) off the event loop. Raises StartupError if it can't."""
        return cls.from_settings(settings, await asyncio.to_thread(load_captioner, settings))

    @classmethod
    def from_settings(cls, settings: Settings, captioner: CaptionerLike) -> InferenceWorker:
        """A worker that owns `captioner`, sized by the queue, batch and cache settings."""
        return cls(
            captioner,
            queue_max=settings.queue_max,
            batch_max=settings.batch_max,
            batch_wait_ms=settings.batch_wait_ms,
            cache_size=settings.encoded_cache_size,
            max_image_pixels=settings.max_image_pixels,
            domain_check=settings.domain_check == "on",
        )

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._accepting = True
            self._task = asyncio.create_task(self._run(), name="inference-worker")

    async def warm_up(self, image: Any) -> float:
        """Run every model path once on `image`, so the first user doesn't pay for
        torch's one-time setup; returns the seconds it took."""

        def run() -> None:
            encoded = self._captioner.encode([image])
            headline = self._captioner.captions(encoded, 2)[0].attention
            self._captioner.greedy(encoded, "attention")
            self._captioner.sample(encoded, 2, decoder="attention", temperature=1.0)
            self._attention_figure(image, list(headline.tokens), headline.alphas)
            if self.domain_check:  # labels load their own layers on first use
                self._captioner.domain(encoded)
                self._captioner.imagenet_labels(encoded, k=LABELS_K)

        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self._encoding, run)
        return time.perf_counter() - started

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def stop(self, timeout: float) -> None:
        """Stop accepting jobs, finish the accepted ones within `timeout` seconds, and
        fail whatever is left with `WorkerStopped` so no job waits forever."""
        self._accepting = False
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("worker_drain_timeout", left=self._queue.qsize() + len(self._in_flight))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        leftovers = list(self._in_flight)
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
            self._queue.task_done()
        for job in leftovers:
            self._settle(job, WorkerStopped("the bot is restarting"), 0.0, 0, "stopped")
        self._in_flight = []
        for executor in (self._encoding, self._decoding):
            executor.shutdown(wait=False, cancel_futures=True)

    # ---- the API handlers use --------------------------------------------------------

    async def is_cached(self, key: str) -> bool:
        return await self.cache.holds(key)

    async def caption(
        self,
        photo: PhotoInput,
        *,
        n_samples: int,
        anyway: bool = False,
        chat_id: int | None = None,
        message_id: int | None = None,
    ) -> CaptionResult:
        """Both greedy captions plus `n_samples` sampled ones (temperature 1); for a photo
        outside the domain, its ImageNet labels instead, unless `anyway`."""
        return await self._submit(
            _Job(
                "caption",
                photo,
                n=n_samples,
                anyway=anyway,
                chat_id=chat_id,
                message_id=message_id,
            )
        )

    async def samples(
        self,
        photo: PhotoInput,
        *,
        n: int,
        temperature: float = 1.0,
        chat_id: int | None = None,
        message_id: int | None = None,
    ) -> SamplesResult:
        return await self._submit(
            _Job(
                "samples",
                photo,
                n=n,
                temperature=temperature,
                chat_id=chat_id,
                message_id=message_id,
            )
        )

    async def attention(
        self,
        photo: PhotoInput,
        *,
        chat_id: int | None = None,
        message_id: int | None = None,
    ) -> AttentionResult:
        return await self._submit(_Job("attention", photo, chat_id=chat_id, message_id=message_id))

    async def _submit(self, job: _Job) -> Any:
        if not self._accepting:
            raise WorkerStopped("the bot is restarting")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull("too many images are waiting") from None
        return await job.future

    # ---- the batching loop (event loop side) -----------------------------------------

    async def _run(self) -> None:
        """Batch after batch: batch k+1 is read and encoded while batch k decodes."""
        decoding: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await self._next_batch()
                # A handler that gave up (cancelled) no longer needs its job run.
                live = [job for job in batch if not job.future.done()]
                self._in_flight.extend(live)
                if self._hold:
                    log.warning("test_holding_jobs", jobs=len(batch))
                    await asyncio.Event().wait()  # until SIGKILL, or stop() fails the jobs
                started = time.perf_counter()
                await self._stage(self._encoding, self._front, live)
                if decoding is not None:
                    await decoding  # replies leave in batch order
                decoding = asyncio.create_task(self._decode(batch, live, started))
        finally:
            if decoding is not None:
                decoding.cancel()  # stop() fails its jobs, which are still in self._in_flight

    async def _next_batch(self) -> list[_Job]:
        """The next job and those queued behind it, up to `batch_max`; when there were any,
        also those that arrive within `batch_wait_s`.

        A lone job starts at once: waiting for company that is not coming cost a single photo
        the whole window (bench/bot_bench.py: p50 36 -> 26 ms with a 10 ms window). Under load
        jobs queue up while a batch runs, so batches fill anyway, and the window tops them up.
        """
        batch = [await self._queue.get()]
        while len(batch) < self.batch_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if len(batch) == 1:
            return batch
        deadline = asyncio.get_running_loop().time() + self.batch_wait_s
        while len(batch) < self.batch_max and (job := await self._next_job(deadline)):
            batch.append(job)
        return batch

    async def _next_job(self, deadline: float) -> _Job | None:
        """A queued job, waiting for one until the loop time `deadline`; None if none came."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            return None

    async def _decode(self, batch: list[_Job], live: list[_Job], started: float) -> None:
        outcomes = await self._stage(self._decoding, self._back, live)
        self._finish(batch, live, outcomes, (time.perf_counter() - started) * 1000)

    async def _stage(
        self, executor: ThreadPoolExecutor, stage: Callable[[list[_Job]], Any], live: list[_Job]
    ) -> list[Any]:
        """`stage(live)` in its thread. Should the batch machinery itself break, every job of
        the batch fails with InferenceFailed (one job's failure only fails that job: _batched)."""
        if not live:
            return []
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, stage, live)
        except asyncio.CancelledError:
            raise  # stop() gave up waiting: it fails the jobs still in self._in_flight
        except Exception as error:
            log.exception("batch_failed", batch_size=len(live), **_batch_context(live))
            for job in live:
                job.error = job.error or InferenceFailed(str(error))
            return [job.error for job in live]

    def _finish(
        self, batch: list[_Job], live: list[_Job], outcomes: list[Any], inference_ms: float
    ) -> None:
        done = {id(job) for job in live}
        self._in_flight = [job for job in self._in_flight if id(job) not in done]
        for _ in batch:
            self._queue.task_done()
        self.batches_run += 1
        for job, outcome in zip(live, outcomes):
            self._settle(job, outcome, inference_ms, len(live), None)

    def _settle(
        self,
        job: _Job,
        outcome: Any,
        inference_ms: float,
        batch_size: int,
        label: str | None,
    ) -> None:
        failed = isinstance(outcome, BaseException)
        if label is None:
            label = "ok" if not failed else type(outcome).__name__
        log.info(
            "job",
            **job.where(),
            kind=job.kind,
            queue_wait_ms=round((time.perf_counter() - job.enqueued_at) * 1000 - inference_ms, 1),
            inference_ms=round(inference_ms, 1),
            batch_size=batch_size,
            cached=job.from_cache,
            outcome=label,
        )
        self.jobs_done += 1
        if job.future.done():
            return
        if failed:
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    # ---- the batch itself (inference thread) -----------------------------------------

    def _front(self, jobs: list[_Job]) -> None:
        """The encoding stage: photos opened and encoded (or taken from the cache), the domain
        check, and labels for the photos outside it. Failures are recorded on the jobs."""
        self._encode(self._open_photos(jobs))
        self._check_domain(jobs)
        self._label(jobs)

    def _back(self, jobs: list[_Job]) -> list[Any]:
        """The decoding stage: captions, samples and figures; a result or an exception per job,
        in order."""
        self._caption(jobs)
        self._greedy_attention(jobs)
        self._sample(jobs)
        return [self._result(job) if job.error is None else job.error for job in jobs]

    def _open_photos(self, jobs: list[_Job]) -> list[_Job]:
        """Cached encodings, or the downloaded bytes decoded; returns the jobs to encode."""
        to_encode: list[_Job] = []
        for job in jobs:
            # With the bytes at hand the handler already found no entry: only a local one
            # (this process encoded the photo meanwhile) is looked for, never a shared cache's
            # (a Redis GET that missed per new photo, in the encoding stage).
            cache = self.cache.get if job.photo.data is None else self.cache.get_local
            entry = cache(job.photo.key)
            if entry is not None:
                job.encoded, job.thumbnail, job.from_cache = entry.encoded, entry.thumbnail, True
            elif job.photo.data is None:
                job.error = NotCached(job.photo.key)
            else:
                try:
                    job.image = self._open_image(job.photo.data, self._max_image_pixels)
                except Exception as error:
                    job.error = self._as_worker_error(error, job, "decode")
                    continue
                to_encode.append(job)
        return to_encode

    def _encode(self, jobs: list[_Job]) -> None:
        """One encoder forward for every image that wasn't cached."""
        encodings = self._batched(
            jobs, "encode", lambda group: self._captioner.encode([job.image for job in group])
        )
        for job, encoded in zip(jobs, encodings):
            if encoded is not None:
                job.encoded = encoded
                self._cache(job)

    def _cache(self, job: _Job) -> None:
        job.thumbnail = _thumbnail(job.image)
        job.image = None  # the full-size decode is no longer needed
        self.cache.put(job.photo.key, _CacheEntry(job.encoded, job.thumbnail), job.photo.data)

    def _check_domain(self, jobs: list[_Job]) -> None:
        """The domain check's verdict on every encoding, in one call (when it is on)."""
        if not self.domain_check:
            return
        group = _alive(jobs)
        verdicts = self._batched(
            group, "domain", lambda g: self._captioner.domain([job.encoded for job in g])
        )
        for job, verdict in zip(group, verdicts):
            job.verdict = verdict

    def _label(self, jobs: list[_Job]) -> None:
        """ImageNet labels for the photos outside the domain that aren't captioned."""
        group = _alive(job for job in jobs if _labels_only(job))
        labels = self._batched(
            group,
            "labels",
            lambda g: self._captioner.imagenet_labels([job.encoded for job in g], k=LABELS_K),
        )
        for job, found in zip(group, labels):
            job.labels = list(found)

    def _caption(self, jobs: list[_Job]) -> None:
        """A caption's headline, baseline and samples: one `captions` call per distinct
        (n, temperature), which decodes the attention decoder's greedy caption and its samples
        as one batch (the decoder starts once per image)."""
        groups = _by_sampling(
            job for job in jobs if job.kind == "caption" and not _labels_only(job)
        )
        for (n, temperature), group in groups.items():

            def captions(g: list[_Job], n: int = n, t: float = temperature) -> list[Any]:
                return self._captioner.captions([job.encoded for job in g], n, temperature=t)

            for job, found in zip(group, self._batched(group, "captions", captions)):
                if found is not None:
                    job.greedy["attention"], job.greedy["baseline"] = (
                        found.attention,
                        found.baseline,
                    )
                    job.samples = list(found.samples)

    def _greedy_attention(self, jobs: list[_Job]) -> None:
        """The attention decoder's greedy captions for /attention, in one call."""
        group = _alive(job for job in jobs if job.kind == "attention")
        captions = self._batched(
            group,
            "greedy_attention",
            lambda g: self._captioner.greedy([job.encoded for job in g], "attention"),
        )
        for job, caption in zip(group, captions):
            job.greedy["attention"] = caption

    def _sample(self, jobs: list[_Job]) -> None:
        """/sample's captions: one call per distinct (n, temperature) in the batch."""
        for (n, temperature), group in _by_sampling(
            job for job in jobs if job.kind == "samples"
        ).items():

            def sample(g: list[_Job], n: int = n, t: float = temperature) -> list[list[str]]:
                return self._captioner.sample(
                    [job.encoded for job in g], n, decoder="attention", temperature=t
                )

            for job, samples in zip(group, self._batched(group, "sample", sample)):
                job.samples = samples

    def _result(self, job: _Job) -> Any:
        """What the handler gets for a job that got through every stage."""
        try:
            if _labels_only(job):
                return CaptionResult("", "", [], job.verdict, job.labels)
            if job.kind == "caption":
                return CaptionResult(
                    headline=job.greedy["attention"].text,
                    baseline=job.greedy["baseline"].text,
                    samples=list(job.samples or []),
                    verdict=job.verdict,
                )
            if job.kind == "samples":  # None (n=0) fails the job
                return SamplesResult(list(job.samples), job.verdict)  # type: ignore[arg-type]
            return self._figure(job)
        except Exception as error:
            return self._as_worker_error(error, job, "result")

    def _figure(self, job: _Job) -> AttentionResult:
        """The /attention figure, drawn from the thumbnail and the headline's weights."""
        headline = job.greedy["attention"]
        tokens = list(headline.tokens)
        figure = self._attention_figure(job.thumbnail, tokens, headline.alphas)
        return AttentionResult(headline.text, len(tokens), figure, job.verdict)

    def _batched(
        self,
        group: list[_Job],
        stage: str,
        call: Callable[[list[_Job]], Sequence[Any]],
    ) -> list[Any]:
        """`call(group)`, or job by job if that fails; failed jobs get None + an error."""
        if not group:
            return []
        try:
            results = list(call(group))
            if len(results) != len(group):
                raise RuntimeError(f"{stage} returned {len(results)} results for {len(group)}")
            return results
        except Exception as error:
            if len(group) == 1:
                group[0].error = self._as_worker_error(error, group[0], stage)
                return [None]
        out: list[Any] = []
        for job in group:
            try:
                out.append(list(call([job]))[0])
            except Exception as error:
                job.error = self._as_worker_error(error, job, stage)
                out.append(None)
        return out

    def _as_worker_error(self, error: BaseException, job: _Job, stage: str) -> WorkerError:
        if isinstance(error, WorkerError):
            return error
        if self._image_errors and isinstance(error, self._image_errors):
            return BadImage(str(error))
        log.error(
            "job_failed",
            **job.where(),
            stage=stage,
            kind=job.kind,
            exc_info=error,
        )
        return InferenceFailed(f"{stage} failed")


def _batch_context(jobs: list[_Job]) -> dict[str, Any]:
    """A batch's log context: its one update's, or each update's in lists."""
    if len(jobs) == 1:
        return jobs[0].where()
    keys = sorted({key for job in jobs for key in job.where()})
    return {f"{key}s": [job.where().get(key) for job in jobs] for key in keys}


def _thumbnail(image: Any) -> Any:
    """A bounded-size copy for the cache (PIL images; anything else is kept as is)."""
    if hasattr(image, "thumbnail") and hasattr(image, "copy") and max(image.size) > THUMBNAIL_SIDE:
        image = image.copy()
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return image
