"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from bot.worker import InferenceWorker


@pytest.fixture
def numba_that_cannot_compile(monkeypatch) -> None:
    """numba.njit as on a machine where compiling fails: every kernel it makes raises numba's
    TypingError when called (model/compiled.py must leave their work to numpy)."""
    import numba

    def broken(*args, **kwargs):
        def jit(function):
            def run(*a):
                raise numba.core.errors.TypingError("no such CPU")

            return run

        return jit

    monkeypatch.setattr(numba, "njit", broken)


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
