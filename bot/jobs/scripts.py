"""Lua script calls that travel together: one pipeline, one round trip.

A job's own write (the enqueue, the finish) and the photo book's writes made while the job
was handled go to Redis in one pipeline instead of one round trip each. Each call is an
EVALSHA; a call Redis answers NOSCRIPT (the script was never loaded there, or Redis
restarted) is sent again as EVAL, which loads it. (redis-py's own script objects ask
SCRIPT EXISTS before every pipeline: a round trip more, not fewer.)

Per photo this saved one round trip on the frontend and one on the worker, each a few
hundred microseconds of redis-py on the event loop.

Calls made in the same round of the event loop also share one pipeline (`run_calls`
coalesces them per client): the enqueues of the updates that one getUpdates brought, the
finishes of a batch whose replies were sent together. Each caller still gets its own
results, and a lost connection raises in each of them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError


@functools.cache
def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


@dataclass(frozen=True)
class ScriptCall:
    """One call of a Lua script: its source, keys and arguments."""

    source: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


async def run_calls(client: aioredis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Every call's result, in order, from one pipeline (shared with the other calls made in
    this round of the event loop); a call that failed in Redis has its exception in its place
    (the caller decides). A lost connection raises."""
    if not calls:
        return []
    batcher = _batchers.get(client)
    if batcher is None:
        batcher = _batchers[client] = _Batcher()
    return await batcher.run(client, list(calls))


def sent(client: aioredis.Redis) -> tuple[int, int]:
    """(pipelines, calls) that `run_calls` has sent through this client so far."""
    batcher = _batchers.get(client)
    return (batcher.pipelines, batcher.calls) if batcher is not None else (0, 0)


class _Batcher:
    """One client's script calls, gathered over one round of the event loop and then sent
    in one pipeline. (It does not keep the client: `_batchers` holds it weakly.)"""

    def __init__(self) -> None:
        self.waiting: list[tuple[list[ScriptCall], asyncio.Future[list[Any]]]] = []
        self.pipelines = self.calls = 0  # what was sent so far (tests, measurements)

    async def run(self, client: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self.waiting.append((calls, future))
        if len(self.waiting) == 1:  # the first of this round: send after the round
            loop.call_soon(self._send, client)
        return await future

    def _send(self, client: aioredis.Redis) -> None:
        waiting, self.waiting = self.waiting, []
        task = asyncio.create_task(self._execute(client, waiting))
        _sending.add(task)
        task.add_done_callback(_sending.discard)

    async def _execute(
        self, client: aioredis.Redis, waiting: list[tuple[list[ScriptCall], asyncio.Future]]
    ) -> None:
        calls = [call for batch, _ in waiting for call in batch]
        self.pipelines += 1
        self.calls += len(calls)
        try:
            results = await _pipeline(client, calls)
        except asyncio.CancelledError:  # the loop is closing
            for _, future in waiting:
                future.cancel()
            raise
        except Exception as error:  # every caller sees it (and retries, or gives up)
            for _, future in waiting:
                if not future.done():
                    future.set_exception(error)
            return
        start = 0
        for batch, future in waiting:
            if not future.done():  # a caller cancelled meanwhile
                future.set_result(results[start : start + len(batch)])
            start += len(batch)


# Per client (a client belongs to one event loop); a batch in flight is kept referenced.
_batchers: weakref.WeakKeyDictionary[aioredis.Redis, _Batcher] = weakref.WeakKeyDictionary()
_sending: set[asyncio.Task[None]] = set()


async def _pipeline(client: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for call in calls:
            pipe.evalsha(_sha(call.source), len(call.keys), *call.keys, *call.args)
        results = await pipe.execute(raise_on_error=False)
    for index, (call, result) in enumerate(zip(calls, results)):
        if isinstance(result, NoScriptError):
            try:
                results[index] = await client.eval(
                    call.source, len(call.keys), *call.keys, *call.args
                )
            except ResponseError as error:  # the script itself failed
                results[index] = error
    return results
