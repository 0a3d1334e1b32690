"""numba for the serving path's hottest loops: kernels compiled once per process, or numpy.

A module keeps its kernels' bodies as plain Python beside the numpy code they replace, and asks
`compile_kernels` for them once (lru_cache on the caller's side). Every kernel releases the GIL
while it runs (`nogil`), so the bot's event loop and the other stage's thread go on beside it.
Compiling takes a second (preprocessing's) to four (decoding's) the first time and a fraction of
that from numba's on-disk cache; a kernel that will not compile or run here (no numba, an
unsupported CPU, no cache directory that can be written and no way round it) leaves its work to
numpy: logged, never a failed photo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

log = logging.getLogger("model.compiled")


def compile_kernels(
    owner: str,
    kernels: Mapping[str, Any],
    warm_up: Callable[[SimpleNamespace], None],
    fastmath: bool | set[str] = False,
) -> SimpleNamespace | None:
    """`kernels` compiled by numba, by name, and `warm_up` run on them once (it should call each
    on a tiny input of the types real calls pass, which compiles them or reads them from the
    cache); None without numba, or where compiling or the warm-up failed (logged as `owner`'s)."""
    try:
        import numba
    except ImportError:
        return None

    def compiled(cache: bool) -> SimpleNamespace:
        jit = numba.njit(
            cache=cache, nogil=True, boundscheck=False, error_model="numpy", fastmath=fastmath
        )
        return SimpleNamespace(**{name: jit(kernel) for name, kernel in kernels.items()})

    try:
        try:
            namespace = compiled(cache=True)
        except RuntimeError:  # no writable cache directory: compile in every process
            namespace = compiled(cache=False)
        warm_up(namespace)
    except Exception as error:  # whatever failed, numpy does the work
        log.warning(
            "%s: numba kernels unavailable, numpy instead: %s: %s",
            owner,
            type(error).__name__,
            error,
        )
        return None
    return namespace
