"""The yardstick of `make bench`: the original bot's inference path, re-run on this machine.

Absolute times differ from machine to machine (and on a shared machine, from minute to minute),
so every figure `make bench` prints is also given as a ratio to this reference, timed in the same
run. Both halves of the benchmark (`python -m model bench`, `bench/bot_bench.py`) use this module.

The reference is the original bot's path with random weights, for timing only:
  * preprocessing with torchvision's transforms (resize and centre-crop to 299 px, normalise);
  * Inception v3 (torchvision, `weights=None`): its 2048-d pooled vector, projected to 300;
  * a 3-layer LSTM (embedding 300, hidden 500) over a vocabulary of 10,000;
  * 4 sampled captions of 12 steps each, one after the other, where every step re-runs the LSTM
    over the whole prefix (image vector + the words so far) from a zero state, as the original did.
Each photo is timed twice, on torch threads over every core this process may use (as the original
bot ran) and on one thread, and the faster counts: on a shared machine the two-thread run suffers
most, and the ratios would flatter us.

    python -m bench.reference            # its time per photo and peak RSS on this machine
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from bench import avx2_only

REPO = Path(__file__).resolve().parent.parent


class ReferenceCaptioner(nn.Module):
    IMAGE_SIZE, EMBED, HIDDEN, LAYERS, VOCAB = 299, 300, 500, 3, 10_000
    SAMPLES, STEPS = 4, 12

    def __init__(self, seed: int = 0):
        super().__init__()
        import torchvision
        from torchvision import transforms

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.cnn = torchvision.models.inception_v3(
                weights=None, aux_logits=True, init_weights=True
            )
            self.cnn.fc = nn.Identity()  # the 2048-d pooled vector
            self.image_embed = nn.Linear(2048, self.EMBED)
            self.embed = nn.Embedding(self.VOCAB, self.EMBED)
            self.lstm = nn.LSTM(self.EMBED, self.HIDDEN, num_layers=self.LAYERS, batch_first=True)
            self.out = nn.Linear(self.HIDDEN, self.VOCAB)
        self.transform = transforms.Compose(
            [
                transforms.Resize(self.IMAGE_SIZE),
                transforms.CenterCrop(self.IMAGE_SIZE),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.eval()

    @torch.inference_mode()
    def caption(self, image) -> list[list[int]]:
        """One photo (a PIL image) -> 4 sampled captions of 12 word ids."""
        feature = self.image_embed(self.cnn(self.transform(image).unsqueeze(0))).unsqueeze(
            1
        )  # (1, 1, 300)
        captions = []
        for _ in range(self.SAMPLES):
            words: list[int] = []
            for _ in range(self.STEPS):
                prefix = self.embed(torch.tensor([words], dtype=torch.long))  # (1, t, 300)
                out, _ = self.lstm(torch.cat([feature, prefix], dim=1))  # the whole prefix again
                probs = self.out(out[:, -1]).softmax(dim=1)
                words.append(int(torch.multinomial(probs, 1, generator=self.generator)))
            captions.append(words)
        return captions

    def time_photo(self, image) -> float:
        """Milliseconds for one photo: the faster of a run on torch threads over every core this
        process may use (as the original bot ran) and a run on one thread. On an idle machine the
        first is the faster; on a busy one its threads wait for each other and it can take ten
        times as long, which would flatter every ratio against it."""
        threads = torch.get_num_threads()
        best = float("inf")
        try:
            for count in sorted({len(os.sched_getaffinity(0)), 1}, reverse=True):
                torch.set_num_threads(count)
                started = time.perf_counter()
                self.caption(image)
                best = min(best, (time.perf_counter() - started) * 1000)
        finally:
            torch.set_num_threads(threads)
        return best


@dataclass
class Reference:
    """The reference as measured in this run: its milliseconds per photo, and its peak RSS."""

    ms: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None

    @property
    def p50(self) -> float:
        return statistics.median(self.ms)

    @property
    def fastest(self) -> float:
        return min(self.ms)

    @property
    def photos_per_s(self) -> float:
        return 1000.0 / self.p50

    def describe(self) -> str:
        return (
            f"{self.p50:.0f} ms per photo = {self.photos_per_s:.2f} photos/s "
            f"(median of {len(self.ms)}, fastest {self.fastest:.0f} ms, slowest {max(self.ms):.0f} "
            "ms)" + (f", peak RSS {self.peak_rss_mb:.0f} MB" if self.peak_rss_mb else "")
        )


def reference_peak_rss_mb(timeout: float = 600) -> float:
    """Peak RSS of a fresh process that loads the reference and captions one photo."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.reference", "--rss-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return float(out.stdout.split()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM, not getrusage's ru_maxrss, which Linux carries across
    exec, so a child started by a big parent would report at least the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: KiB too


# ----------------------------------------------------------------------------------------------
# What machine this is, and the report both benchmarks print.


def cpu_description() -> str:
    """Model name, AVX-512 and VNNI or not (from the CPU's flags, and torch's kernel choice),
    cores, load. VNNI (AVX512_VNNI or AVX-VNNI) decides ONNX Runtime's int8 kernels: without it
    a product of int8 and uint8 runs through 16-bit pair sums (model/decoding.py, `Product`)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first CPU's fields
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    avx512 = (
        "AVX-512: yes" if "avx512f" in flags else ("AVX-512: no" if flags else "AVX-512: unknown")
    )
    vnni = "VNNI: " + (
        "yes" if flags & {"avx512_vnni", "avx_vnni"} else "no" if flags else "unknown"
    )
    if avx2_only.emulated() is not None:  # /proc/cpuinfo shows the CPU, not what code sees
        avx512 = "AVX-512: hidden (bench/avx2_only.py: the kernels of an AVX2-only CPU)"
        vnni = "VNNI: hidden"
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{name} ({platform.machine()}), {avx512}, {vnni}, {len(os.sched_getaffinity(0))} cores "
        f"usable, torch {torch.__version__} ({blas}, {capability} kernels), load average "
        f"{os.getloadavg()[0]:.1f}"
    )


@dataclass
class Row:
    """One figure, how it compares with the reference, and its target if it has one.

    kind: "time" (ms: how many times faster than the reference's time per photo), "rate" (per s:
    how many times the reference's photos/s), "memory" (MB: over the reference's peak RSS) or
    None (no comparison). need: the least ratio the target asks for; limit / least: the most /
    the least the value itself may be.
    """

    name: str
    value: float
    unit: str
    kind: str | None = None
    need: float | None = None
    limit: float | None = None
    least: float | None = None

    def ratios(self, ref: Reference) -> tuple[float, float] | None:
        """(against the reference's median photo, against its fastest photo)."""
        if self.kind == "time":
            return ref.p50 / self.value, ref.fastest / self.value
        if self.kind == "rate":
            return self.value * ref.p50 / 1000, self.value * ref.fastest / 1000
        if self.kind == "memory" and ref.peak_rss_mb:
            return (self.value / ref.peak_rss_mb,) * 2
        return None

    def ok(self, ref: Reference, against: int = 1) -> bool | None:
        """A ratio target is met when it holds against the reference's *fastest* photo (against=1):
        on a busy machine the reference's two-threaded run suffers most, and its median flatters us.
        against=0 judges it against the reference's median photo instead."""
        if self.need is not None:
            ratios = self.ratios(ref)  # None: a memory ratio without the reference's peak RSS
            return None if ratios is None else ratios[against] >= self.need
        if self.limit is not None:
            return self.value <= self.limit
        if self.least is not None:
            return self.value >= self.least
        return None

    def cells(self, ref: Reference) -> list[str]:
        unit = self.unit if self.unit == "x" else " " + self.unit
        ratios = self.ratios(ref)
        if ratios is None:
            compared = ["", ""]
        elif self.kind == "memory":
            compared = [f"{ratios[0]:.2f}x its RSS", ""]
        else:
            compared = [f"{r:.1f}x" for r in ratios]
        target = (
            f">= {self.need:g}x"
            if self.need is not None
            else f"<= {self.limit:g}{unit}"
            if self.limit is not None
            else f">= {self.least:g}{unit}"
            if self.least is not None
            else ""
        )
        verdict = {True: "ok", False: "MISSED", None: ""}[self.ok(ref)]
        if verdict == "MISSED" and self.ok(ref, against=0):
            verdict = "MISSED (ok vs its median)"
        return [
            self.name,
            f"{self.value:.{2 if self.unit == 'x' else 1}f}{unit}",
            *compared,
            target,
            verdict,
        ]


def print_report(title: str, ref: Reference, rows: list[Row], notes: Sequence[str] = ()) -> bool:
    """A markdown table: every figure, its ratios to the reference, its target, ok or MISSED."""
    print(f"\n{title}")
    print(f"machine: {cpu_description()}")
    if os.getloadavg()[0] > len(os.sched_getaffinity(0)) + 0.5:
        print(
            "warning: other work shares these cores (load average above the core count): "
            "the times are inflated and noisy; compare the ratios, and repeat"
        )
    print(f"reference (the original bot's path, random weights): {ref.describe()}")
    for note in notes:
        print(note)
    print(
        "| measure | value | vs the reference (its median photo) | vs its fastest photo | target | "
        "|"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row.cells(ref)) + " |")
    return all(row.ok(ref) is not False for row in rows)


def _main() -> int:
    import argparse

    from model.data.scenes import render_scene

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument(
        "--rss-only", action="store_true", help="caption one photo, print the peak RSS (MB)"
    )
    args = parser.parse_args()
    reference = ReferenceCaptioner()
    image = render_scene(20_000_000)[1]
    reference.time_photo(image)  # warm-up: first calls allocate and pick kernels
    if args.rss_only:
        print(f"{peak_rss_mb():.1f}")
        return 0
    times = Reference([reference.time_photo(image) for _ in range(args.photos)])
    print(
        f"machine: {cpu_description()}\nreference: {times.describe()}, peak RSS "
        f"{peak_rss_mb():.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
