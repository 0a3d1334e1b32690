"""The benchmark's yardstick and report (bench/reference.py): shapes and verdicts, no timings."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference import Reference, ReferenceCaptioner, Row, cpu_description  # noqa: E402
from model.data.scenes import render_scene  # noqa: E402


def test_reference_samples_four_captions_of_twelve_words_from_a_10k_vocabulary():
    reference = ReferenceCaptioner()
    captions = reference.caption(render_scene(1)[1])
    assert len(captions) == 4 and all(len(c) == 12 for c in captions)
    assert all(0 <= word < 10_000 for c in captions for word in c)
    assert reference.lstm.num_layers == 3 and reference.lstm.hidden_size == 500
    assert reference.embed.embedding_dim == 300


def test_ratio_targets_are_judged_against_the_reference_fastest_photo():
    ref = Reference([1000.0, 2000.0, 9000.0], peak_rss_mb=1000.0)  # median 2000 ms, fastest 1000 ms
    assert Row("photo", 40.0, "ms", "time").ratios(ref) == (50.0, 25.0)
    assert (
        Row("photo", 40.0, "ms", "time", need=40).ok(ref) is False
    )  # 50x on the median, 25x on the fastest
    assert Row("photo", 20.0, "ms", "time", need=40).ok(ref) is True
    assert Row("rate", 20.0, "photos/s", "rate").ratios(ref) == (40.0, 20.0)
    assert Row("rss", 700.0, "MB", "memory", limit=800).ok(ref) is True
    assert Row("rss", 900.0, "MB", "memory", limit=800).cells(ref)[-1] == "MISSED"
    assert Row("plain", 1.0, "ms").ok(ref) is None


def test_machine_line_names_the_cpu_and_avx512():
    line = cpu_description()
    assert "AVX-512: " in line and "VNNI: " in line and "cores usable" in line


def test_the_benchmark_driver_collects_its_garbage_before_a_timed_run_not_during_it():
    import gc
    import weakref

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bot_bench import driver_collects_outside

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # only the cycle collector frees it
    gone = weakref.ref(cycle)
    del cycle
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        try:
            with driver_collects_outside():
                assert gone() is None  # collected before the clock starts
                assert not gc.isenabled()  # and no collection while it runs
                raise KeyboardInterrupt  # a run that ends badly
        except KeyboardInterrupt:
            pass
        assert gc.isenabled()
    finally:
        if not was_enabled:
            gc.disable()
