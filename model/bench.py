"""`make bench` (model part): latency, throughput and memory of the bundled model on this CPU."""
from __future__ import annotations

import resource
import statistics
import time

import torch

from model.captioner import MAX_LEN, Captioner
from model.figure import attention_figure

TARGETS = {"p50 encode + both greedy + 5 samples": 60.0, "attention figure": 150.0,
           f"attention figure, {MAX_LEN} words": 150.0, "domain check, one in-domain image": 2.0,
           "peak RSS after loading": 600.0}


def _timed(fn, repeats: int) -> list[float]:
    fn()   # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def _photo():
    """A real photo for the out-of-domain path: scikit-image's chelsea where installed, else noise."""
    from PIL import Image

    from model.nonscenes import noise

    try:
        import skimage.data
    except ImportError:
        return noise()
    return Image.fromarray(skimage.data.chelsea())


def main(weights_dir, repeats: int = 50) -> int:
    from model.data.scenes import render_scene

    captioner = Captioner.load(weights_dir)
    rss_loaded = peak_rss_mb()
    images = [render_scene(20_000_000 + i)[1] for i in range(32)]
    rows = []

    def one_image():
        encoded = captioner.encode(images[:1])
        captioner.greedy(encoded, "attention")
        captioner.greedy(encoded, "baseline")
        captioner.sample(encoded, 5)

    latency = _timed(one_image, repeats)
    rows.append(("p50 encode + both greedy + 5 samples", statistics.median(latency), "ms"))
    rows.append(("p95 encode + both greedy + 5 samples", _percentile(latency, 95), "ms"))
    for batch in (1, 8, 32):
        times = _timed(lambda: captioner.encode(images[:batch]), max(3, repeats // batch))
        rows.append((f"encoder throughput, batch {batch}", batch * 1000 / statistics.median(times), "img/s"))
    encoded = captioner.encode(images[:1])
    for kind in captioner.decoders:
        rows.append((f"{kind} greedy caption", statistics.median(_timed(lambda: captioner.greedy(encoded, kind), repeats)), "ms"))
    rows.append(("5 attention samples (one batch)",
                 statistics.median(_timed(lambda: captioner.sample(encoded, 5), repeats)), "ms"))
    rows.append(("domain check, one in-domain image",
                 statistics.median(_timed(lambda: captioner.domain(encoded), repeats)), "ms"))
    photo = _photo()
    outside = captioner.encode([photo])
    rows.append(("ImageNet labels, one photo (the extra cost when out of domain)",
                 statistics.median(_timed(lambda: captioner.imagenet_labels(outside), repeats)), "ms"))
    caption = captioner.greedy(encoded, "attention")[0]
    rows.append(("attention figure", statistics.median(_timed(
        lambda: attention_figure(images[0], caption.tokens, caption.alphas), max(5, repeats // 5))), "ms"))
    longest = ["word"] * MAX_LEN, [caption.alphas[0]] * MAX_LEN
    rows.append((f"attention figure, {MAX_LEN} words", statistics.median(_timed(
        lambda: attention_figure(photo, *longest), max(5, repeats // 5))), "ms"))
    rows.append(("peak RSS after loading", rss_loaded, "MB"))
    rows.append(("peak RSS after the benchmark", peak_rss_mb(), "MB"))

    print(f"model benchmark: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| measure | value | target |\n|---|---|---|")
    for name, value, unit in rows:
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target:.0f} {unit} {'ok' if value <= target else 'MISSED'}"
        print(f"| {name} | {value:.1f} {unit} | {verdict} |")
    return 0
