"""The bundled weights directory: what the model card says about its files is true."""

import hashlib
import re
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def card_files() -> dict[str, tuple[int, str]]:
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    rows = re.findall(r"^\| (\S+) \| (\d+) \| `([0-9a-f]{64})` \|$", card, flags=re.MULTILINE)
    return {name: (int(size), digest) for name, size, digest in rows}


def test_card_lists_every_weights_file_with_its_size_and_sha256():
    listed = card_files()
    present = {
        p.name
        for p in WEIGHTS.iterdir()
        if p.suffix in (".pt", ".json") and p.name != "scores.json"
    }
    assert set(listed) == present
    for name, (size, digest) in listed.items():
        data = (WEIGHTS / name).read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == digest, name


def test_weights_stay_under_forty_megabytes():
    total = sum(p.stat().st_size for p in WEIGHTS.iterdir() if p.is_file())
    assert total < 40 * 2**20, f"weights/ holds {total / 2**20:.1f} MiB"


def test_card_says_when_the_weights_are_bit_identical():
    from model.card import reproducibility

    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    threads = int(re.search(r"^- Machine: .*?, (\d+) threads", card, flags=re.MULTILINE).group(1))
    assert reproducibility(threads) in card.splitlines()
