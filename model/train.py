"""Training the decoders: python -m model train --data scenes|coco|karpathy --decoder both

Training runs in two phases:
1. encode every training and validation image once into an HDF5 cache (model/cache.py);
2. train each decoder on the cached grids with teacher forcing: Adam, gradient clipping, a
   warm-up + cosine learning-rate schedule, validation after every epoch, best checkpoint kept.
   The attention decoder goes first and fine-tunes the encoder's last blocks as it trains: their
   input, the block-4 map, is part of the cached grid (EncoderTop.regrid). The baseline then
   trains on the tuned encoder's features, the ones it will see at inference.
On CUDA the steps run under bfloat16 autocast; on a CPU in float32.

A run is deterministic where torch allows it: seeded, torch.use_deterministic_algorithms(True) and
a fixed number of CPU threads (`threads`: how a sum is split over threads changes its last bits).
On a CPU, the same data, config, torch build and thread count give bit-identical weight files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import decoding
from model.cache import build_cache, load_cache
from model.data.sources import dataset_examples, load_image
from model.decoders import DecoderConfig, build_decoder, decoder_tables, save_decoder
from model.devices import resolve_device
from model.domain import DOMAIN_FILE
from model.encoder import TUNED_TOP_FILE, Encoder, EncoderConfig, EncoderTop
from model.vocab import Vocabulary, tokenize


@dataclass
class TrainConfig:
    """What a training run does. `python -m model train` has an option per field of a plain type
    (--out-dir for out_dir), its comment the option's help; a comment that starts `a | b | c`
    lists the only values allowed (model/cli.py). The comments' column is kept: a comment line
    below a field, in that column, continues its help."""

    # fmt: off
    data: str = "scenes"                  # scenes | coco | karpathy
    decoder: str = "both"                 # baseline | attention | both
    out_dir: str = "weights"              # where the weights go: vocab, encoder config, decoder
                                          # checkpoints
    work_dir: str = "runs/scenes"         # feature caches and logs
    backbone: str = "efficientnet_lite0"  # efficientnet_lite0 | resnet50 | resnet101 | inception_v3
    cell_px: int = 16                     # 16 | 32: EfficientNet-Lite0 grid cells of 16 px (14x14
                                          # at 224 px) or 32 px (7x7, a 4x smaller cache); see
                                          # EncoderConfig.cell_px
    input_px: int = 224                   # EfficientNet-Lite0's input side, a multiple of 32
                                          # (160 px: 10x10 cells, 0.6x the encoder's time, but
                                          # 5.6 points less exact match at 96 px; model card)
    # scenes
    train_scenes: int = 16_000            # training scenes
    val_scenes: int = 500                 # validation scenes, each rendered once per val_renders
                                          # entry
    # Each validation scene is rendered once per (side, JPEG quality; 0: PNG) here, and the best
    # epoch is the one with the best exact match over all of them: a caption should survive a small
    # JPEG.
    val_renders: tuple = ((224, 0), (96, 70))
    # real datasets (paths the user brings)
    captions_json: str = ""               # COCO captions_train2017.json
    val_captions_json: str = ""           # COCO captions_val2017.json
    karpathy_json: str = ""               # dataset_coco.json / dataset_flickr8k.json
    images_dir: str = ""                  # the training images (and the validation ones, if no
                                          # other)
    val_images_dir: str = ""              # the validation images
    max_val_images: int = 1000            # photos kept for validation
    min_word_count: int = 5               # photos: rarer words become <unk>; scenes use every word
    # optimisation
    epochs: int = 24                      # epochs of the baseline, and of the attention decoder
                                          # unless --attention-epochs says otherwise
    attention_epochs: int = 12            # each epoch also trains the encoder's top (below): 1.6x
                                          # the time
    batch_size: int = 96
    lr: float = 1e-3                      # learning rate of the attention decoder (at 2e-3 its
                                          # validation score swung by 15 points)
    lr_baseline: float = 2e-3             # the simpler baseline learns steadily at twice the rate
    lr_encoder_top: float = 3e-4          # learning rate of the encoder's last blocks (5-6),
                                          # fine-tuned with the attention decoder; 0: frozen
    weight_decay: float = 0.0
    warmup_steps: int = 200               # steps of linear warm-up before the cosine decay
                                          # (warmup_cosine)
    lr_floor: float = 0.05                # where the cosine decay ends, as a share of each learning
                                          # rate
    grad_clip: float = 5.0                # gradient norm clipped to this
    max_len: int = 18                     # words per caption in training (longer ones are cut)
    patience: int = 30                    # epochs without a better validation score (the schedule
                                          # ends at a low rate, where the best epochs are: stop
                                          # late)
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    encode_batch: int = 32                # images per encoder pass while building the caches
    workers: int = 1                      # processes that render or read pictures for the caches
    threads: int = 2                      # torch CPU threads while training: fixed, for
                                          # bit-identical weights
    decoder_overrides: dict = field(default_factory=dict)   # e.g. {"hidden_dim": 512}
    # fmt: on


# ----------------------------------------------------------------------------------------------
# The learning-rate schedule


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """The learning rate at `step` as a share of the configured one (nanoGPT's get_lr): a linear
    warm-up over `warmup_steps`, then a half cosine from 1 down to `floor` at `total_steps`, and
    `floor` after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Batches


def encode_captions(captions: list[list[str]], vocab: Vocabulary, max_len: int) -> torch.Tensor:
    """(N, max_refs, max_len + 2) ids, <pad>-filled; images with fewer refs repeat their first."""
    refs = max(len(c) for c in captions)
    table = torch.full((len(captions), refs, max_len + 2), vocab.pad, dtype=torch.long)
    for i, caps in enumerate(captions):
        for j in range(refs):
            ids = vocab.encode(caps[j % len(caps)], max_len)
            table[i, j, : len(ids)] = torch.tensor(ids)
    return table


def batches(
    grid: torch.Tensor, captions: torch.Tensor, batch_size: int, generator: torch.Generator
):
    """One epoch: every image once, each with one of its references drawn at random."""
    order = torch.randperm(grid.shape[0], generator=generator)
    choice = torch.randint(captions.shape[1], (grid.shape[0],), generator=generator)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids = captions[rows, choice[rows]]  # (B, T+2)
        length = int((ids != 0).sum(1).max())  # trim padding columns
        yield grid[rows].float(), ids[:, :length]


def caption_loss(decoder, grid: torch.Tensor, ids: torch.Tensor, pad: int):
    inputs, targets = ids[:, :-1], ids[:, 1:]  # predict word t+1 from words <= t
    logits, alphas = decoder(grid, inputs)  # (B, T, V), (B, T, N) | None
    mask = (targets != pad).float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad
    )
    if alphas is not None:
        loss = loss + decoder.regulariser(alphas, mask)
    return loss


# ----------------------------------------------------------------------------------------------
# Validation


def greedy_texts(
    decoder, grid: torch.Tensor, vocab: Vocabulary, device, batch_size: int = 256
) -> list[str]:
    """The greedy captions of every grid, decoded as the Captioner decodes (model/decoding.py)."""
    steps = decoding.runtime(decoder_tables(decoder))
    texts = []
    for start in range(0, grid.shape[0], batch_size):
        batch = grid[start : start + batch_size].float().cpu().numpy()
        ids, _ = decoding.decode(steps, batch, vocab.bos, vocab.eos)
        texts += [" ".join(vocab.decode(i)) for i in ids]
    return texts


def validation_score(
    texts: list[str], keys: list[str], references: list[list[str]]
) -> tuple[str, float]:
    """Scenes: the exact-match rate of the spec. Real photos: BLEU-4."""
    if keys and keys[0].startswith("scene/"):
        from model.data.scenes import make_scene
        from model.data.semantics import judge

        exact = [judge(make_scene(int(k.split("/")[1])), t).exact for k, t in zip(keys, texts)]
        return "exact_match", sum(exact) / len(exact)
    from model.metrics import bleu

    return "bleu4", bleu(
        [tokenize(t) for t in texts], [[tokenize(r) for r in refs] for refs in references]
    )[3]


# ----------------------------------------------------------------------------------------------
# The loop


def tunes_encoder_top(kind: str, config: TrainConfig) -> bool:
    return (
        kind == "attention"
        and config.lr_encoder_top > 0
        and config.backbone == "efficientnet_lite0"
        and config.cell_px == 16
    )


def regrid_all(grid: torch.Tensor, top: EncoderTop, device, batch_size: int = 256) -> torch.Tensor:
    """Every cached grid with its top share recomputed by `top` (no gradients), float16 on the
    CPU."""
    top.eval()
    with torch.inference_mode():
        return torch.cat(
            [
                top.regrid(grid[start : start + batch_size].to(device).float()).half().cpu()
                for start in range(0, grid.shape[0], batch_size)
            ]
        )


def train_decoder(
    kind: str, config: TrainConfig, train, val, vocab: Vocabulary, device: torch.device, log=print
) -> dict:
    """Train one decoder. The attention decoder also fine-tunes the encoder's top blocks (unless
    lr_encoder_top is 0): ImageNet features of small, blurred objects named their shapes poorly,
    and the top learns from the cache alone (EncoderTop.regrid). Its best state goes to
    encoder_top.pt."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    decoder_config = DecoderConfig(
        kind=kind,
        vocab_size=len(vocab),
        feature_dim=train.grid.shape[2],
        num_cells=train.grid.shape[1],
        **config.decoder_overrides,
    )
    decoder = build_decoder(decoder_config)
    decoder.norm.fit(train.grid[:2000])
    decoder.to(device)
    captions = encode_captions(train.captions, vocab, config.max_len)
    groups: list[dict[str, Any]] = [
        {
            "params": list(decoder.parameters()),
            "lr": config.lr_baseline if kind == "baseline" else config.lr,
        }
    ]
    top = None
    if tunes_encoder_top(kind, config):
        top = EncoderTop.pretrained().to(device)
        groups.append({"params": list(top.parameters()), "lr": config.lr_encoder_top})
    optimiser = torch.optim.Adam(groups, weight_decay=config.weight_decay)
    parameters = [p for group in groups for p in group["params"]]
    epochs = config.attention_epochs if kind == "attention" else config.epochs
    steps_per_epoch = math.ceil(train.grid.shape[0] / config.batch_size)
    total_steps = steps_per_epoch * epochs

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: warmup_cosine(step, config.warmup_steps, total_steps, config.lr_floor),
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out_path = Path(config.out_dir) / f"{kind}.pt"
    best = {"score": -1.0, "epoch": 0}
    history, started = [], time.time()
    for epoch in range(1, epochs + 1):
        decoder.train()
        if top is not None:
            top.train()
        total, count = 0.0, 0
        for grid, ids in batches(train.grid, captions, config.batch_size, generator):
            grid, ids = grid.to(device, non_blocking=True), ids.to(device, non_blocking=True)
            with autocast:
                if top is not None:
                    grid = top.regrid(grid)
                loss = caption_loss(decoder, grid, ids, vocab.pad)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimiser.step()
            scheduler.step()
            total, count = total + loss.item() * len(ids), count + len(ids)
        texts = greedy_texts(
            decoder, val.grid if top is None else regrid_all(val.grid, top, device), vocab, device
        )
        metric, score = validation_score(texts, val.keys, val.captions)
        history.append(
            {
                "epoch": epoch,
                "loss": round(total / count, 4),
                metric: round(score, 4),
                "seconds": round(time.time() - started, 1),
            }
        )
        log(
            f"[{kind}] epoch {epoch:3d}  loss {total / count:.4f}  val {metric} {score:.4f}  "
            f"({time.time() - started:.0f}s)  e.g. {texts[0]!r}"
        )
        if score > best["score"]:
            best = {"score": score, "epoch": epoch}
            save_decoder(decoder.cpu(), out_path)
            decoder.to(device)
            if top is not None:
                torch.save(
                    {k: v.cpu() for k, v in top.state_dict().items()},
                    out_path.parent / TUNED_TOP_FILE,
                )
        elif epoch - best["epoch"] >= config.patience:
            log(f"[{kind}] no better validation score for {config.patience} epochs: stopping")
            break
    return {
        "kind": kind,
        "best_epoch": best["epoch"],
        f"best_val_{metric}": round(best["score"], 4),
        "seconds": round(time.time() - started, 1),
        "history": history,
        "config": decoder_config.to_dict(),
        "tuned_encoder_top": top is not None,
    }


def prepare(config: TrainConfig, device: torch.device, log=print):
    """Build (or resume) the caches and the vocabulary; return (train, val, vocab)."""
    encoder = Encoder(
        EncoderConfig(backbone=config.backbone, cell_px=config.cell_px, input_px=config.input_px)
    )
    train_examples, val_examples = dataset_examples(config)
    work = Path(config.work_dir)
    log(
        f"encoding {len(train_examples)} training and {len(val_examples)} validation images -> "
        f"{work}"
    )
    started = time.time()
    for name, examples in (("train", train_examples), ("val", val_examples)):
        build_cache(
            work / f"{name}.h5",
            examples,
            encoder,
            load_image,
            batch_size=config.encode_batch,
            workers=config.workers,
            device=device,
            desc=f"encoding {name}",
        )
    log(f"encoded in {time.time() - started:.0f}s")
    train, val = load_cache(work / "train.h5"), load_cache(work / "val.h5")
    min_count = 1 if config.data == "scenes" else config.min_word_count
    vocab = Vocabulary.build((c for caps in train.captions for c in caps), min_count=min_count)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocab.json")
    (out / "encoder.json").write_text(json.dumps(encoder.config.to_dict(), indent=2) + "\n")
    return train, val, vocab, time.time() - started


@contextlib.contextmanager
def deterministic(device: torch.device, threads: int):
    """Deterministic kernels and a fixed CPU thread count for the run; restored afterwards."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # On CUDA a few kernels have no deterministic version: warn there instead of failing the run.
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])


def run(config: TrainConfig, log=print) -> dict:
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    device = resolve_device(config.device)
    with deterministic(device, config.threads):
        return _run(config, device, log)


def _run(config: TrainConfig, device: torch.device, log) -> dict:
    train, val, vocab, encode_seconds = prepare(config, device, log)
    # Attention first: when it fine-tunes the encoder's top, the baseline then trains on the tuned
    # encoder's features, since one encoder serves both decoders at inference.
    kinds = ["attention", "baseline"] if config.decoder == "both" else [config.decoder]
    results = {
        "train_config": asdict(config),
        "vocab_size": len(vocab),
        "train_images": train.grid.shape[0],
        "val_images": val.grid.shape[0],
        "encode_seconds": round(encode_seconds, 1),
        "decoders": {},
    }
    tuned_top = Path(config.out_dir) / TUNED_TOP_FILE
    if "attention" in kinds and tuned_top.exists():
        tuned_top.unlink()  # stale: this run's attention decoder reads its own encoder
    # A domain check describes the data and the encoder it was fitted with: stale too (COCO weights
    # declare none; for scenes, make weights and python -m model domain-fit fit a new one).
    (Path(config.out_dir) / DOMAIN_FILE).unlink(missing_ok=True)
    for kind in kinds:
        if kind == "baseline" and tuned_top.exists():
            top = EncoderTop.pretrained().to(device)
            top.load_state_dict(torch.load(tuned_top, map_location=device, weights_only=True))
            train.grid, val.grid = (
                regrid_all(train.grid, top, device),
                regrid_all(val.grid, top, device),
            )
        results["decoders"][kind] = train_decoder(kind, config, train, val, vocab, device, log)
    Path(config.work_dir, "training.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
