"""`make bench` (model part): latency, throughput and memory of the bundled model on this CPU,
each figure also as a ratio to the original bot's inference path timed in the same run
(bench/reference.py)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from model.captioner import MAX_LEN, Captioner
from model.devices import usable_cpus
from model.figure import attention_figure

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ lives beside the package, not in it
    sys.path.insert(0, str(REPO))

from bench.reference import (  # noqa: E402
    Reference,
    ReferenceCaptioner,
    Row,
    print_report,
    reference_peak_rss_mb,
)

NEED_PHOTO = 40.0  # one photo, model alone: p50 at least 40x faster than the reference
RSS_LIMIT_MB = 600.0  # the model alone, loaded and captioning
FIGURE_LIMIT_MS = 150.0  # the attention figure, also for the longest caption
DOMAIN_LIMIT_MS = 2.0  # the domain check of one in-domain image


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# A serving process: the model loaded as the bot loads it, 8 photos captioned (with samples and
# labels); prints its peak RSS in MB (VmHWM: getrusage's ru_maxrss is carried across exec from
# the torch-laden parent) and whether torch was imported.
_SERVING = """
import sys
from pathlib import Path
from model.captioner import Captioner
from model.data.scenes import render_scene
captioner = Captioner.load(sys.argv[1], device="auto")
encoded = captioner.encode([render_scene(20_000_000 + i)[1] for i in range(8)])
captioner.captions(encoded, 5)
captioner.imagenet_labels(encoded)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(int(status["VmHWM"].split()[0]) / 1024, "torch" in sys.modules)
"""


def serving_peak_rss(weights_dir) -> tuple[float, bool]:
    """(peak RSS in MB, torch imported) of a fresh process serving the model: this benchmark's
    own process has torch loaded for the reference, which serving does not (506 MB alone)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _SERVING, str(weights_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout.split()
    return float(out[-2]), out[-1] == "True"


def _photo():
    """A real photo for the out-of-domain path: scikit-image's chelsea where installed, else
    noise."""
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
    captioner.set_cpu_threads(usable_cpus())  # as the bot runs it
    rss_serving, serving_torch = serving_peak_rss(weights_dir)
    images = [render_scene(20_000_000 + i)[1] for i in range(32)]

    def one_image():  # the attention greedy caption and its samples decode as one batch
        captioner.captions(captioner.encode(images[:1]), 5)

    # The headline figure, interleaved with the reference so that both see the same load.
    reference = ReferenceCaptioner()
    reference.time_photo(images[0])
    ref, latency, round_ratios = Reference(), [], []
    per_round = 8
    one_image()
    for _ in range(max(5, repeats // per_round)):
        ref.ms.append(reference.time_photo(images[0]))
        ours = _timed(one_image, per_round)
        latency += ours
        round_ratios.append(ref.ms[-1] / statistics.median(ours))
    del reference
    ref.peak_rss_mb = reference_peak_rss_mb()

    rows = [
        Row(
            "one photo: encode + both greedy + 5 samples, p50",
            statistics.median(latency),
            "ms",
            "time",
            need=NEED_PHOTO,
        ),
        Row(
            "one photo: encode + both greedy + 5 samples, p95",
            _percentile(latency, 95),
            "ms",
            "time",
        ),
    ]
    for batch in (1, 8, 32):
        per_s = (
            batch
            * 1000
            / statistics.median(
                _timed(
                    lambda batch=batch: captioner.encode(images[:batch]), max(3, repeats // batch)
                )
            )
        )
        rows.append(Row(f"encoder throughput, batch {batch}", per_s, "img/s", "rate"))
    encoded = captioner.encode(images[:1])
    for kind in captioner.decoders:
        rows.append(
            Row(
                f"{kind} greedy caption",
                statistics.median(
                    _timed(lambda kind=kind: captioner.greedy(encoded, kind), repeats)
                ),
                "ms",
                "time",
            )
        )
    rows.append(
        Row(
            "5 attention samples (one batch)",
            statistics.median(_timed(lambda: captioner.sample(encoded, 5), repeats)),
            "ms",
            "time",
        )
    )
    rows.append(
        Row(
            "both greedy captions + 5 samples (Captioner.captions)",
            statistics.median(_timed(lambda: captioner.captions(encoded, 5), repeats)),
            "ms",
            "time",
        )
    )
    rows.append(
        Row(
            "domain check, one in-domain image",
            statistics.median(_timed(lambda: captioner.domain(encoded), repeats)),
            "ms",
            limit=DOMAIN_LIMIT_MS,
        )
    )
    photo = _photo()
    outside = captioner.encode([photo])
    rows.append(
        Row(
            "ImageNet labels, one photo (the extra cost when out of domain)",
            statistics.median(_timed(lambda: captioner.imagenet_labels(outside), repeats)),
            "ms",
        )
    )
    caption = captioner.greedy(encoded, "attention")[0]
    assert caption.alphas is not None  # the attention decoder's caption has its maps
    rows.append(
        Row(
            "attention figure",
            statistics.median(
                _timed(
                    lambda: attention_figure(images[0], caption.tokens, caption.alphas),
                    max(5, repeats // 5),
                )
            ),
            "ms",
            limit=FIGURE_LIMIT_MS,
        )
    )
    longest = ["word"] * MAX_LEN, [caption.alphas[0]] * MAX_LEN
    rows.append(
        Row(
            f"attention figure, {MAX_LEN} words",
            statistics.median(
                _timed(lambda: attention_figure(photo, *longest), max(5, repeats // 5))
            ),
            "ms",
            limit=FIGURE_LIMIT_MS,
        )
    )
    rows.append(
        Row(
            "peak RSS of a process serving the model (loaded, 8 photos captioned)",
            rss_serving,
            "MB",
            "memory",
            limit=RSS_LIMIT_MB,
        )
    )

    notes = [
        f"encoder: {captioner.encoder.describe()}; "
        f"{torch.get_num_threads()} torch thread(s), a batch's images encoded side by side on "
        f"{usable_cpus()} cores (as the bot runs it)",
        f"the serving process {'imported' if serving_torch else 'did not import'} torch",
        "noise: the headline ratio per round ranged "
        f"{min(round_ratios):.1f}x-{max(round_ratios):.1f}x "
        f"over {len(round_ratios)} rounds of 1 reference photo + {per_round} of ours "
        f"(our fastest: {min(latency):.1f} ms)",
    ]
    print_report("Model benchmark (python -m model bench)", ref, rows, notes)
    return 0
