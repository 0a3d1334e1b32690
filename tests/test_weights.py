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


def test_rescoring_rewrites_only_the_cards_scores(tmp_path):
    import json
    import shutil

    from model.card import quality_bar, rescore_card

    for name in ("MODEL_CARD.md", "scores.json"):
        shutil.copy(WEIGHTS / name, tmp_path / name)
    original = (tmp_path / "MODEL_CARD.md").read_text()
    scores = json.loads((tmp_path / "scores.json").read_text())
    rescore_card(tmp_path, scores)
    assert (tmp_path / "MODEL_CARD.md").read_text() == original  # the same scores: the same card

    scores["1024px JPEG q70"]["baseline"]["exact_match"] = 0.5
    card = rescore_card(tmp_path, scores).read_text()
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert "| 1024px JPEG q70 | baseline | 0.500 |" in card
    loss_line = quality_bar(scores)[-1]
    assert loss_line.endswith("/ 32.1 | missed |") and loss_line in card
    changed = [a for a, b in zip(original.splitlines(), card.splitlines()) if a != b]
    assert len(changed) == 2 and len(card.splitlines()) == len(original.splitlines())
