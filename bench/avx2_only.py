"""Run a command as on an AVX2-only x86 CPU, on this one: the libraries' kernel choice of a CPU
without AVX-512, AVX-VNNI or AMX, at this machine's speed otherwise.

    python bench/avx2_only.py -- python -m model bench     # any command
    make bench-avx2                                         # the model's and the bot's benchmarks

Issue 13's targets hold "whatever the x86_64 machine", and it was filed from an AVX2-only AMD VM
that this project's sessions have not had since. The preloaded library (bench/avx2_only.c, built
here with gcc into build/) makes the CPU's CPUID answers say "no AVX-512" to every library in the
process and its children, so that ONNX Runtime, numba, numpy and torch (the reference's
convolutions included) run the kernels they run on such a CPU; glibc's string functions are
masked with GLIBC_TUNABLES. The benchmark's report then says the features are hidden. What it
cannot change is the rest of this CPU (caches, clock, and its full-width 256-bit units), so it
tells how the AVX2 code paths compare with the reference's AVX2 paths here, not the issue VM's
absolute times.

Needs Linux's CPUID faulting (`cpuid_fault` in /proc/cpuinfo: recent Intel and AMD CPUs, and
this project's VMs) and gcc; `unavailable()` says what is missing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_name("avx2_only.c")
LIBRARY = REPO / "build" / "avx2_only.so"
# glibc picks its string functions' variants before any library loads; these names are its
# tunables' (glibc 2.26 and later), and names it does not know are ignored.
GLIBC_HIDDEN = "-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512ER,-AVX512PF,-AVX512VL"


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def unavailable() -> str | None:
    """Why the mask cannot run here, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86_64, not {platform.system()} on {platform.machine()}"
    try:
        flags = _cpu_flags()
    except OSError as error:
        return f"cannot read /proc/cpuinfo: {error}"
    if "cpuid_fault" not in flags:
        return "this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo)"
    if not LIBRARY.exists() and shutil.which("gcc") is None:
        return "gcc is needed to build bench/avx2_only.c"
    return None


def library() -> Path:
    """The preloadable library, built when missing or older than its source."""
    if not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime:
        LIBRARY.parent.mkdir(parents=True, exist_ok=True)
        built = LIBRARY.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(built), str(SOURCE)], check=True
        )
        built.replace(LIBRARY)  # atomic: a concurrent build never preloads half a file
    return LIBRARY


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the mask preloaded."""
    env = dict(os.environ if base is None else base)
    preload = [str(library()), *filter(None, env.get("LD_PRELOAD", "").split(":"))]
    env["LD_PRELOAD"] = ":".join(preload)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"glibc.cpu.hwcaps={GLIBC_HIDDEN}"])
    # Python's faulthandler would take SIGSEGV from the mask and report each CPUID as a crash.
    env.pop("PYTHONFAULTHANDLER", None)
    return env


def emulated() -> int | None:
    """In this process: how many CPUID instructions the mask has answered, or None when it is
    not loaded."""
    try:
        count = ctypes.CDLL(None).avx2_only_emulated
    except AttributeError:
        return None
    count.restype = ctypes.c_ulong
    return int(count())


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print(__doc__)
        return 2
    reason = unavailable()
    if reason:
        print(f"avx2_only: {reason}", file=sys.stderr)
        return 1
    env = environment()
    os.execvpe(command[0], command, env)  # replaces this process; returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
