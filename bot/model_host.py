"""Loads the captioner the inference worker owns: weights, device and CPU threads.

Only `bot.worker` imports this module (`InferenceWorker.load`); the rest of the bot reaches
the model through the worker alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.log import get_logger
from model.devices import TorchMissing, usable_cpus

if TYPE_CHECKING:
    from bot.settings import Settings

log = get_logger("bot")


class StartupError(RuntimeError):
    """The bot cannot start; str() says why and what to do."""


def load_captioner(settings: Settings) -> Any:
    try:
        return _load(settings)
    except TorchMissing as error:  # the Docker image serves the bundle it was built with only
        raise StartupError(str(error)) from None


def _load(settings: Settings) -> Any:
    from model.captioner import Captioner

    if settings.captioner == "untrained":
        log.warning("untrained_captioner", note="random decoders: captions are nonsense")
        return _use_cpu_threads(Captioner.untrained(seed=0), settings)
    try:  # Captioner.load resolves DEVICE=auto itself
        captioner = Captioner.load(weights_dir=str(settings.weights_dir), device=settings.device)
    except TorchMissing:
        raise
    except Exception as error:  # missing, partial or corrupt files: all mean "no usable weights"
        raise StartupError(
            f"cannot load the captioning weights from WEIGHTS_DIR={settings.weights_dir}: "
            f"{type(error).__name__}: {error}. Train or copy them there (see README), or set "
            "CAPTIONER=untrained to try the bot with random decoders."
        ) from None
    missing = [name for name in ("attention", "baseline") if name not in captioner.decoders]
    if missing:
        raise StartupError(
            f"WEIGHTS_DIR={settings.weights_dir} has no {' or '.join(missing)} decoder "
            f"({', '.join(f'{name}.pt' for name in missing)}); the bot needs both."
        )
    return _use_cpu_threads(captioner, settings)


def _use_cpu_threads(captioner: Any, settings: Settings) -> Any:
    if captioner.device == "cpu":
        threads = settings.inference_threads or usable_cpus()
        captioner.set_cpu_threads(threads)
        log.info("inference_threads", threads=threads)
    return captioner
