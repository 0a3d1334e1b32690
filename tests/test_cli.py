"""python -m model caption: the offline face of the product, run as a user would."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from model.captioner import DEFAULT_WEIGHTS_DIR
from model.data.scenes import make_scene, render_scene
from model.data.semantics import judge
from model.figure import figure_size
from model.preprocessing import EncoderConfig

pytestmark = pytest.mark.slow
SEEDS = (30_000_001, 30_000_002)


def caption(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "model", "caption", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for seed in SEEDS:
        _, image = render_scene(seed, 256)
        image.save(folder / f"scene{seed}.png")
        paths.append(folder / f"scene{seed}.png")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "broken.jpg").write_bytes(paths[0].read_bytes()[:300])
    return folder, paths


def test_json_output_matches_the_schema_and_bad_files_fail_alone(pictures, tmp_path):
    folder, (first, second) = pictures
    result = caption(
        first,
        folder / "notes.txt",
        second,
        folder / "broken.jpg",
        "--json",
        "--samples",
        "2",
        "--heatmap-dir",
        tmp_path / "maps",
    )
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert any("notes.txt" in line and "not an image" in line for line in errors)
    assert any("broken.jpg" in line and "corrupt or truncated" in line for line in errors)
    documents = json.loads(result.stdout)
    assert [d["image"] for d in documents] == [str(first), str(second)]
    rows, cols = EncoderConfig.of_weights(DEFAULT_WEIGHTS_DIR).grid
    for seed, document in zip(SEEDS, documents):
        baseline, attention = document["baseline"], document["attention"]
        # The scenes are known: the attention decoder (19 in 20 exactly right) names them.
        assert judge(make_scene(seed), attention["greedy"]).exact, (seed, attention["greedy"])
        verdict = judge(make_scene(seed), baseline["greedy"])
        assert verdict.groups_recalled >= 1, (seed, baseline["greedy"])
        assert len(baseline["samples"]) == 2 and all(
            isinstance(s, str) for s in baseline["samples"]
        )
        assert attention["tokens"] == attention["greedy"].split()
        assert len(attention["alphas"]) == len(attention["tokens"])
        for grid in attention["alphas"]:
            assert len(grid) == rows and all(len(row) == cols for row in grid)
            assert sum(map(sum, grid)) == pytest.approx(1.0, abs=1e-4)
        assert len(attention["samples"]) == 2
        figure = Image.open(document["heatmap"])
        assert figure.size == figure_size(len(attention["tokens"]))  # the grid the bot sends
        domain = document["domain"]
        assert set(domain) == {"in_domain", "score", "threshold"} and domain["in_domain"] is True
        assert isinstance(domain["score"], float) and domain["score"] <= domain["threshold"]
        labels = document["imagenet"]
        assert len(labels) == 5 and all(set(label) == {"label", "p"} for label in labels)
        assert all(isinstance(label["label"], str) and 0 <= label["p"] <= 1 for label in labels)


def test_plain_output_numbers_the_samples_and_beam_replaces_greedy(pictures):
    _, (first, _) = pictures
    result = caption(first, "--samples", "3", "--beam", "3", "--decoder", "attention")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(first)
    assert lines[1].split()[:4] == ["domain", "like", "the", "training"]
    assert lines[2].split()[0] == "imagenet" and lines[2].count("%") == 5
    assert lines[3].strip().startswith("attention beam:")
    assert judge(make_scene(SEEDS[0]), lines[3].split(":", 1)[1]).exact, lines[3]
    assert [line.split(".")[0].strip() for line in lines[4:7]] == ["1", "2", "3"]


def test_bad_arguments_are_refused_by_the_parser(pictures):
    _, (first, _) = pictures
    result = caption(first, "--beam", "0")
    assert result.returncode == 2 and "must be >= 1" in result.stderr


def test_missing_file_is_named(tmp_path):
    result = caption(tmp_path / "nope.png")
    assert result.returncode == 1 and "nope.png" in result.stderr and "cannot read" in result.stderr
