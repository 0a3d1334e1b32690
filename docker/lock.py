"""Regenerate docker/requirements.txt: pyproject.toml's runtime dependencies, resolved and
pinned for the image's Python (3.11, x86_64 Linux) next to torch==TORCH_VERSION.

    python docker/lock.py            # run with a Python 3.11 whose pip reaches PyPI

torchvision is left out: the bot never imports it (only `--backbone resnet*` training does).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LEFT_OUT = {"torch", "torchvision"}
# Required only under some Pythons, and this script's 3.11 may be newer than the image's:
# redis needs async-timeout below 3.11.3, and Debian bookworm's python3 is 3.11.2.
MARKER_ONLY = ["async-timeout>=4.0.3"]


def torch_version() -> str:
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, "Dockerfile: no ARG TORCH_VERSION="
    return match.group(1)


def main() -> int:
    if sys.version_info[:2] != (3, 11):
        print("docker/lock.py: run it with Python 3.11, the image's Python", file=sys.stderr)
        return 2
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [d for d in deps if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() not in LEFT_OUT]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--only-binary",
                ":all:",
                "--report",
                str(report),
                f"torch=={torch_version()}",
                *wanted,
                *MARKER_ONLY,
            ],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    pins = sorted(
        (i["metadata"]["name"], i["metadata"]["version"])
        for i in installs
        if i["metadata"]["name"].lower() not in LEFT_OUT
    )
    header = (REPO / "docker" / "requirements.txt").read_text().split("\n\n", 1)[0]
    body = "\n".join(
        f"{name}=={version}" for name, version in sorted(pins, key=lambda p: p[0].lower())
    )
    (HERE / "requirements.txt").write_text(f"{header}\n\n{body}\n")
    print(f"docker/requirements.txt: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
