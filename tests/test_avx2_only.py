"""bench/avx2_only.py: a process on this CPU given the kernels of an AVX2-only one, and what the
model does there: the same integers from the int8 product (its 7 bits never saturate the pair
sums of AVX2's integer kernels) and the same captions."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bench import avx2_only
from model.decoding import Product

pytestmark = pytest.mark.skipif(
    avx2_only.unavailable() is not None, reason=f"avx2_only: {avx2_only.unavailable()}"
)


def run(code: str, masked: bool = True) -> dict:
    """`code` in a fresh Python, masked or not; it prints one JSON object last."""
    env = avx2_only.environment() if masked else None
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=avx2_only.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


WHAT_CODE_SEES = """
import json
import llvmlite.binding as llvm
import onnxruntime, torch
from numpy._core._multiarray_umath import __cpu_features__ as numpy
from bench import avx2_only
from bench.reference import cpu_description
host = llvm.get_host_cpu_features()
print(json.dumps({
    "numpy": {name: numpy[name] for name in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX")},
    "llvm": {name: host.get(name, False) for name in ("avx2", "fma", "avx512f", "avxvnni")},
    "torch": torch.backends.cpu.get_cpu_capability(),
    "emulated": avx2_only.emulated(),
    "machine": cpu_description(),
}))
"""


def test_every_library_in_the_process_sees_avx2_and_no_avx512():
    seen = run(WHAT_CODE_SEES)
    assert seen["numpy"] == {"AVX2": True, "FMA3": True, "AVX512F": False, "AVX512_SKX": False}
    assert seen["llvm"] == {"avx2": True, "fma": True, "avx512f": False, "avxvnni": False}
    assert seen["torch"] == "AVX2"
    assert seen["emulated"] > 0  # CPUID answered by the mask, not the CPU
    assert "AVX-512: hidden" in seen["machine"] and "VNNI: hidden" in seen["machine"]
    unmasked = run(WHAT_CODE_SEES, masked=False)
    assert unmasked["emulated"] is None and "hidden" not in unmasked["machine"]


def test_a_child_process_and_a_thread_are_masked_too():
    seen = run(
        """
import json, subprocess, sys, threading
import llvmlite.binding as llvm
found = {}
thread = threading.Thread(target=lambda: found.update(llvm.get_host_cpu_features()))
thread.start(); thread.join()
child = subprocess.run([sys.executable, "-c", "import llvmlite.binding as l; "
                        "print(l.get_host_cpu_features().get('avx512f', False))"],
                       capture_output=True, text=True, check=True)
print(json.dumps({"thread": found.get("avx512f", False), "child": child.stdout.strip()}))
"""
    )
    assert seen == {"thread": False, "child": "False"}


def test_onnx_runtime_takes_its_avx2_integer_kernels():
    """Proof that ONNX Runtime's MLAS runs its AVX2 kernels: their vpmaddubsw adds each two
    neighbouring uint8 x int8 products in 16 bits, saturating, where VNNI's vpdpbusd does not.
    With every x at 255 and every w at 127 each pair is 64,770, and the AVX2 sum of 64 is
    32 x 32,767."""
    code = """
import json, numpy as np, onnxruntime
from model.decoding import _model, _node
nodes = [_node("Cast", ["x"], "x8", to=2), _node("MatMulInteger", ["x8", "w"], "y32"),
         _node("Cast", ["y32"], "y", to=1)]
model = _model(nodes, {"w": np.full((64, 4), 127, np.int8)}, {"x": 2}, {"y": 2})
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
print(json.dumps(session.run(None, {"x": np.full((2, 64), 255, np.float32)})[0].tolist()))
"""
    assert run(code) == [[32 * 32_767.0] * 4] * 2


def test_the_int8_product_gives_the_same_integers_with_avx2_kernels(tmp_path):
    """`Product(int8=True)` rounds x to 7 bits so that AVX2's saturating pair sums stay exact:
    on the real AVX2 kernels (ONNX Runtime) its results equal the numpy fallback's, which
    computes the integers exactly, also for rows and columns at their largest."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((384, 96)).astype(np.float32)
    w[:, 0] = 1.0  # a column all at 127
    x = np.tanh(rng.standard_normal((8, 384)) * 2).astype(np.float32)
    x[6], x[7] = 1.0, -1.0  # rows all at their largest: every pair of products at its largest
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import json, numpy as np
from model.decoding import Product
w, x = np.load({str(tmp_path / "w.npy")!r}), np.load({str(tmp_path / "x.npy")!r})
print(json.dumps(Product(w, True, int8=True)(x).tolist()))
"""
    on_avx2 = np.array(run(code), np.float32)
    exact = Product(w, False, int8=True)(x)  # numpy: the integers in float64, exactly
    np.testing.assert_allclose(on_avx2, exact, rtol=1e-6, atol=1e-7)


CAPTIONS = """
import json
from model.captioner import Captioner
from model.data.scenes import render_scene
captioner = Captioner.load("weights")
images = [render_scene(20_000_000 + i)[1] for i in range(48)]
encoded = captioner.encode(images)
print(json.dumps({
    "attention": [c.text for c in captioner.greedy(encoded, "attention")],
    "baseline": [c.text for c in captioner.greedy(encoded, "baseline")],
    "samples": captioner.sample(encoded[:8], 3, seed=5),
}))
"""


def test_the_bundled_model_writes_the_same_captions_with_avx2_kernels():
    """The held-out scenes' captions and seeded samples are the same words with every kernel of
    an AVX2-only CPU: numba's AVX2 code for the decoders' loops, MLAS's AVX2 products. (ONNX
    Runtime 1.32's convolutions gave bit-identical grids either way here, 16 scenes.)"""
    assert run(CAPTIONS) == run(CAPTIONS, masked=False)


def test_the_command_line_runs_a_command_masked():
    out = subprocess.run(
        [sys.executable, "bench/avx2_only.py", "--", sys.executable, "-c", WHAT_CODE_SEES],
        cwd=avx2_only.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1])["torch"] == "AVX2"


def test_without_cpuid_faulting_it_refuses_rather_than_run_unmasked(monkeypatch, capsys):
    monkeypatch.setattr(avx2_only, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert "no CPUID faulting" in (avx2_only.unavailable() or "")
    assert avx2_only.main(["--", "true"]) == 1
    assert "no CPUID faulting" in capsys.readouterr().err
