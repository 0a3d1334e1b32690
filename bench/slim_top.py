"""What a narrower encoder top would buy and cost: the measurement behind issue 13's open question.

    python bench/slim_top.py --keep 0.5 --epochs 8 --eval     # about 15 minutes on 2 cores

The encoder's top (EfficientNet-Lite0's MBConv layers 11..15, `model.encoder.EncoderTop`, the part
fine-tuned on the scenes) holds a third of the CNN's multiply-adds: 121 of 364 million at 224 px,
most of them in its 1x1 convolutions to and from 672-1,152 expansion channels at 7x7. This script
1. keeps the `keep` share of each top layer's expansion channels, those that matter most to its
   output (an expansion channel's mean |activation| over training scenes, times the norm of its
   column in the projection that follows);
2. distils the narrowed top on the training scenes' block-4 maps, so that it gives the fine-tuned
   top's output (the block-6 map, mean squared error with each channel scaled by its spread). The
   lower CNN, the ImageNet head (which runs the wheel's original top) and the decoders stay as
   they are;
3. reports the CNN's time in LiteRT, the serving runtime, against the shipped top (interleaved
   rounds, one and two threads) and, with --eval, the model card's rows with the narrowed top,
   how many greedy captions stay word for word the same, and how many domain-check verdicts stay;
   with --refit also what the domain check rejects once refitted on each top's grids (15 minutes
   more).

It changes no weights: whether a faster top that rewords some captions meets the quality target
(`make eval` within 0.5 points of the model card on every row) is the question it answers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.data.sources import TRAIN_SEED_BASE, VAL_SEED_BASE  # noqa: E402
from model.encoder import TOP_FIRST_BLOCK, TUNED_TOP_FILE, Encoder, EncoderTop  # noqa: E402
from model.preprocessing import EncoderConfig, preprocess_array  # noqa: E402

WEIGHTS = REPO / "weights"


# ---- data: block-4 maps of rendered training scenes ----------------------------------------


def lower_cnn(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, S, S) -> the block-4 map (B, 112, S/16, S/16), the top's input."""
    net = encoder.network
    x = images.contiguous(memory_format=torch.channels_last)
    x = net._swish(net._bn0(net._conv_stem(x)))  # "_swish" is ReLU6 in the Lite models
    for block in net._blocks[:TOP_FIRST_BLOCK]:
        x = block(x)
    return x


_worker_encoder: Encoder | None = None


def _maps_of(seeds: list[int]) -> np.ndarray:
    """(in a worker process) the block-4 maps of these training renders, float16."""
    global _worker_encoder
    from model.data.sources import load_image, scene_key, training_variant

    if _worker_encoder is None:
        torch.set_num_threads(1)
        _worker_encoder = Encoder(EncoderConfig.of_weights(WEIGHTS))
    pixels = [preprocess_array(load_image(scene_key(s, *training_variant(s)))) for s in seeds]
    with torch.inference_mode():
        maps = lower_cnn(_worker_encoder, torch.from_numpy(np.stack(pixels)))
    return maps.numpy().astype(np.float16)


def block4_maps(first_seed: int, count: int, processes: int = 2) -> torch.Tensor:
    """Training renders (their sizes and JPEG qualities as in training) -> (count, 112, 14, 14)."""
    chunks = [
        list(range(s, min(s + 50, first_seed + count)))
        for s in range(first_seed, first_seed + count, 50)
    ]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        maps = np.concatenate(pool.map(_maps_of, chunks))
    return torch.from_numpy(maps.astype(np.float32)).contiguous(memory_format=torch.channels_last)


# ---- the narrowed top ---------------------------------------------------------------------


def shipped_top() -> EncoderTop:
    top = EncoderTop.pretrained()
    top.load_state_dict(torch.load(WEIGHTS / TUNED_TOP_FILE, map_location="cpu", weights_only=True))
    return top.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def channel_importance(top: EncoderTop, maps: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, each expansion channel's mean |activation| (after the depthwise convolution)
    times the norm of its column in the projection."""
    means: list[torch.Tensor] = []
    hooks = [
        block._project_conv.register_forward_hook(
            lambda module, inputs, output: means.append(inputs[0].abs().mean((0, 2, 3)))
        )
        for block in top.blocks
    ]
    with torch.inference_mode():
        top(maps)
    for hook in hooks:
        hook.remove()
    return [
        mean * block._project_conv.weight.flatten(1).norm(dim=0)
        for mean, block in zip(means, top.blocks)
    ]


def _keep_channels(conv: nn.Conv2d, keep: torch.Tensor, outputs: bool) -> None:
    """Slice a convolution in place to the `keep` channels of its outputs (else its inputs)."""
    weight = conv.weight.detach()
    if outputs:
        conv.weight = nn.Parameter(weight[keep].clone())
        conv.bias = nn.Parameter(conv.bias.detach()[keep].clone())
        conv.out_channels = len(keep)
        if conv.groups > 1:  # depthwise: one group per channel
            conv.in_channels = conv.groups = len(keep)
    else:
        conv.weight = nn.Parameter(weight[:, keep].clone())
        conv.in_channels = len(keep)


def narrowed(top: EncoderTop, maps: torch.Tensor, keep: float) -> EncoderTop:
    """A copy of `top` with the `keep` share (rounded to a multiple of 8) of each layer's
    expansion channels, the most important ones, in their order."""
    slim = copy.deepcopy(top)
    for block, score in zip(slim.blocks, channel_importance(top, maps)):
        count = max(8, round(len(score) * keep / 8) * 8)
        chosen = torch.sort(torch.topk(score, min(count, len(score))).indices).values
        _keep_channels(block._expand_conv, chosen, outputs=True)
        _keep_channels(block._depthwise_conv, chosen, outputs=True)
        _keep_channels(block._project_conv, chosen, outputs=False)
    return slim


# ---- distillation -------------------------------------------------------------------------


def get_lr(step: int, steps: int, peak: float = 1e-3, warmup: int = 100) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _outputs(top: nn.Module, maps: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([top(maps[i : i + batch]) for i in range(0, len(maps), batch)])


def distil(
    student: EncoderTop,
    teacher: EncoderTop,
    maps: torch.Tensor,
    val_maps: torch.Tensor,
    epochs: int,
    batch: int = 64,
    log=print,
) -> float:
    """Train `student` to give `teacher`'s outputs; returns the validation error (the mean
    squared difference over the teacher's per-channel variance)."""
    targets, val_targets = _outputs(teacher, maps), _outputs(teacher, val_maps)
    spread = targets.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)

    def error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        return (((got - want) / spread) ** 2).mean()

    student.eval()
    validation = error(_outputs(student, val_maps), val_targets)
    student.requires_grad_(True).train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    steps_per_epoch = len(maps) // batch
    steps = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(len(maps))
        for i in range(steps_per_epoch):
            for group in optimiser.param_groups:
                group["lr"] = get_lr(
                    epoch * steps_per_epoch + i, steps, warmup=min(100, steps // 10)
                )
            rows = order[i * batch : (i + 1) * batch]
            loss = error(student(maps[rows]), targets[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        student.eval()
        validation = error(_outputs(student, val_maps), val_targets)
        log(f"epoch {epoch + 1}/{epochs}: validation error {validation:.4f}")
        student.train()
    student.eval().requires_grad_(False)
    return float(validation)


# ---- what it buys: the CNN's time in LiteRT -----------------------------------------------


def with_top(encoder: Encoder, top: EncoderTop) -> Encoder:
    """`encoder` with `top`'s layers in place of its own (the same module objects)."""
    encoder.network._blocks = nn.ModuleList(
        list(encoder.network._blocks[:TOP_FIRST_BLOCK]) + list(top.blocks)
    )
    return encoder


def cnn_times(
    encoders: dict[str, Encoder], rounds: int = 40, runs: int = 10
) -> dict[int, dict[str, float]]:
    """The CNN's median time (ms) for one 224 px image in LiteRT per encoder, interleaved."""
    from model.lite_encoder import _Interpreters, build

    folder = Path(tempfile.mkdtemp(prefix="slim-top-"))
    paths = {}
    for name, encoder in encoders.items():
        paths[name] = folder / f"{name}.tflite"
        paths[name].write_bytes(build(encoder))
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    medians: dict[int, dict[str, float]] = {}
    for threads in (1, 2):
        interpreters = {name: _Interpreters(path, threads) for name, path in paths.items()}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, run in interpreters.items():
                for _ in range(runs):
                    started = time.perf_counter()
                    run(image)
                    times[name].append((time.perf_counter() - started) * 1000)
        medians[threads] = {name: statistics.median(t) for name, t in times.items()}
    return medians


# ---- what it costs: the model card's rows, captions and domain verdicts -------------------


def _per_top(captioner, tops: dict[str, list], pictures: list, work, batch: int = 32) -> dict:
    """work(images) on `pictures` (scene keys or images) a batch at a time, each batch rendered
    once and run with each top's layers in the encoder in turn: {top's name: [work's result for
    each batch]}."""
    from model.data.sources import load_image

    encoder = captioner.side.encoder
    out: dict[str, list] = {name: [] for name in tops}
    for start in range(0, len(pictures), batch):
        part = pictures[start : start + batch]
        images = [load_image(p) if isinstance(p, str) else p for p in part]
        for name, blocks in tops.items():
            encoder.network._blocks = nn.ModuleList(blocks)
            out[name].append(work(images))
    return out


def refit_domain(
    captioner,
    tops: dict[str, list],
    fit_scenes: int = 3000,
    calibration_scenes: int = 100,
    log=print,
) -> None:
    """The domain check fitted and calibrated again on each top's grids, from the renders
    `python -m model domain-fit` uses, and the non-scenes each refitted check lets through."""
    from model import domain
    from model.data.sources import scene_key, training_variant
    from model.nonscenes import nonscenes

    def features(pictures: list) -> dict[str, np.ndarray]:
        encode = functools.partial(domain.encode_features, captioner)
        parts = _per_top(captioner, tops, pictures, encode)
        return {name: np.concatenate(rows) for name, rows in parts.items()}

    seeds = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + fit_scenes)
    fitted = features([scene_key(s, *training_variant(s)) for s in seeds])
    seeds = range(domain.CALIBRATION_SEED_BASE, domain.CALIBRATION_SEED_BASE + calibration_scenes)
    held_out = {
        domain.render_name(side, quality): features([scene_key(s, side, quality) for s in seeds])
        for side, quality in domain.CALIBRATION_RENDERS
    }
    others = nonscenes()
    other = features(list(others.values()))
    for name in tops:
        check = domain.fit(fitted[name])
        check.threshold = domain.calibrate(check, {k: v[name] for k, v in held_out.items()})
        outside = check.score_features(other[name]) > check.threshold
        through = [n for n, out in zip(others, outside) if not out]
        log(
            f"domain check refitted on the {name} top's grids: {int(outside.sum())}/{len(others)} "
            f"non-scenes rejected; let through: {', '.join(through) or 'none'}"
        )


def _agreement(scenes: list, texts: dict[str, list[str]]) -> str:
    """How the two tops' captions of `scenes` compare: word for word, and as the card judges."""
    from model.data.semantics import aggregate, judge

    judged = {name: [judge(s, t) for s, t in zip(scenes, texts[name])] for name in texts}
    same = sum(a == b for a, b in zip(texts["shipped"], texts["narrow"]))
    only = {
        name: sum(j.exact and not k.exact for j, k in zip(judged[name], judged[other]))
        for name, other in (("shipped", "narrow"), ("narrow", "shipped"))
    }
    rows = {name: aggregate(judged[name]) for name in judged}
    metrics = ("exact_match", "group_recall", "hallucination_rate", "relation_accuracy")
    moved = ", ".join(f"{m} {rows['shipped'][m]:.3f} -> {rows['narrow'][m]:.3f}" for m in metrics)
    return (
        f"{same}/{len(scenes)} captions the same; exact only with the shipped top "
        f"{only['shipped']}, only with the narrow one {only['narrow']}; {moved}"
    )


def compare(slim: EncoderTop, count: int, refit: bool = False, log=print) -> None:
    """Greedy captions and domain verdicts of the card's held-out scenes (and the non-scenes)
    with the shipped top and with `slim`, side by side."""
    import os

    os.environ["CAPTION_ENCODER_RUNTIME"] = "torch"
    from model.captioner import Captioner
    from model.data.scenes import make_scene
    from model.data.sources import TEST_SEED_BASE, scene_examples
    from model.evaluate import SCENE_VARIANTS
    from model.nonscenes import nonscenes

    captioner = Captioner.load(WEIGHTS)
    encoder = captioner.side.encoder
    shipped = list(encoder.network._blocks)
    tops = {"shipped": shipped, "narrow": list(with_top(encoder, slim).network._blocks)}

    def outcomes(images: list) -> list[tuple[dict[str, str], bool]]:
        """Per picture: its greedy caption by decoder, and whether it is in the domain."""
        encoded = captioner.encode(images)
        captions = {kind: captioner.greedy(encoded, kind) for kind in captioner.decoders}
        verdicts = captioner.domain(encoded)
        return [
            ({kind: " ".join(captions[kind][i].tokens) for kind in captions}, v.in_domain)
            for i, v in enumerate(verdicts)
        ]

    def run(pictures: list) -> dict[str, list[tuple[dict[str, str], bool]]]:
        parts = _per_top(captioner, tops, pictures, outcomes)
        return {name: [row for part in rows for row in part] for name, rows in parts.items()}

    for variant, (side, quality) in SCENE_VARIANTS.items():
        examples = scene_examples(TEST_SEED_BASE, count, side=side, jpeg_quality=quality)
        scenes = [make_scene(int(e.key.split("/")[1])) for e in examples]
        got = run([e.key for e in examples])
        for kind in captioner.decoders:
            texts = {name: [caption[kind] for caption, _ in rows] for name, rows in got.items()}
            log(f"{variant} {kind}: {_agreement(scenes, texts)}")
        flipped = sum(a[1] != b[1] for a, b in zip(got["shipped"], got["narrow"]))
        log(f"{variant}: domain verdicts changed {flipped}/{count}")
    pictures = nonscenes()
    got = run(list(pictures.values()))
    inside = {name: [verdict for _, verdict in rows] for name, rows in got.items()}
    changed = [
        f"{name} ({'in' if a else 'out'} -> {'in' if b else 'out'})"
        for name, a, b in zip(pictures, inside["shipped"], inside["narrow"])
        if a != b
    ]
    rejected = {name: inside[name].count(False) for name in inside}
    log(
        f"non-scenes: judged outside the domain {rejected['shipped']}/{len(pictures)} with the "
        f"shipped top, {rejected['narrow']}/{len(pictures)} with the narrow one; changed: "
        + (", ".join(changed) or "none")
    )
    if refit:
        refit_domain(captioner, tops, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="share of expansion channels kept")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=16_000, help="training renders")
    parser.add_argument("--val-scenes", type=int, default=1000, help="validation renders")
    parser.add_argument("--eval", action="store_true", help="the card's scenes, both tops")
    parser.add_argument("--count", type=int, default=1000, help="held-out scenes per render")
    parser.add_argument(
        "--refit", action="store_true", help="with --eval: the domain check refitted per top"
    )
    parser.add_argument("--save", type=Path, help="write the narrowed top (torch.save) here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    log = lambda text: print(text, flush=True)  # noqa: E731
    started = time.perf_counter()
    maps, val_maps = (
        block4_maps(TRAIN_SEED_BASE, args.scenes),
        block4_maps(VAL_SEED_BASE, args.val_scenes),
    )
    seconds = time.perf_counter() - started
    log(f"block-4 maps of {len(maps)} + {len(val_maps)} renders: {seconds:.0f} s")
    teacher = shipped_top()
    slim = narrowed(teacher, maps[:2000], args.keep)
    widths = {
        name: [b._depthwise_conv.out_channels for b in top.blocks]
        for name, top in (("narrow", slim), ("shipped", teacher))
    }
    log(f"expansion channels kept: {widths['narrow']} of {widths['shipped']}")
    distil(slim, teacher, maps, val_maps, args.epochs, log=log)
    if args.save:
        torch.save(slim, args.save)
    config = EncoderConfig.of_weights(WEIGHTS)
    shipped = Encoder(config)
    shipped.load_tuned_top(WEIGHTS / TUNED_TOP_FILE)
    times = cnn_times({"shipped": shipped, "narrow": with_top(Encoder(config), slim)})
    for threads, medians in times.items():
        log(
            f"CNN in LiteRT, {threads} thread(s): {medians['shipped']:.2f} -> "
            f"{medians['narrow']:.2f} ms ({medians['shipped'] / medians['narrow']:.3f}x)"
        )
    if args.eval:
        compare(slim, args.count, refit=args.refit, log=log)


if __name__ == "__main__":
    main()
