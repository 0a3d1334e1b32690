"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest_asyncio

from bot.worker import InferenceWorker


@pytest_asyncio.fixture
async def stop_at_end() -> AsyncIterator[Callable[[InferenceWorker], InferenceWorker]]:
    """`worker = stop_at_end(InferenceWorker(...))`: the worker is stopped when the test
    ends, whether it passed or failed, so no worker task or inference thread outlives it."""
    workers: list[InferenceWorker] = []

    def register(worker: InferenceWorker) -> InferenceWorker:
        workers.append(worker)
        return worker

    yield register
    for worker in workers:
        if worker.running:  # not stopped by the test itself (a second stop() could wait)
            await worker.stop(timeout=5)
