"""Command line: python -m model {caption,train,eval,weights,domain-fit,bench}."""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
from dataclasses import fields
from pathlib import Path
from typing import Any

from model.captioner import DEFAULT_WEIGHTS_DIR


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0 < value <= 5:
        raise argparse.ArgumentTypeError(f"must be in (0, 5], got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# caption


def caption_command(args) -> int:
    from model.captioner import Captioner
    from model.figure import attention_figure
    from model.images import ImageError, open_image

    captioner = Captioner.load(args.weights, device=args.device)
    decoders = list(captioner.decoders) if args.decoder == "both" else [args.decoder]
    heatmap_dir = Path(args.heatmap_dir) if args.heatmap_dir else None
    if heatmap_dir:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    results, failed = [], False
    for path in args.images:
        try:
            image = open_image(path)
        except ImageError as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            failed = True
            continue
        encoded = captioner.encode([image])
        (verdict,) = captioner.domain(encoded)
        entry = {
            "image": path,
            "domain": domain_json(verdict),
            "imagenet": [
                {"label": label.label, "p": round(label.p, 4)}
                for label in captioner.imagenet_labels(encoded, 5)[0]
            ],
        }
        for kind in decoders:
            greedy = captioner.greedy(encoded, kind)[0]
            part: dict[str, Any] = {"greedy": greedy.text}
            if kind == "attention":
                part["tokens"], part["alphas"] = greedy.tokens, greedy.alphas
            if args.beam:
                part["beam"] = captioner.beam(encoded, args.beam, kind)[0].text
            part["samples"] = (
                captioner.sample(
                    encoded,
                    args.samples,
                    decoder=kind,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    seed=args.seed,
                )[0]
                if args.samples
                else []
            )
            entry[kind] = part
            if kind == "attention" and heatmap_dir:
                figure = heatmap_dir / f"{Path(path).stem}_attention.jpg"
                figure.write_bytes(attention_figure(image, greedy.tokens, greedy.alphas))
                entry["heatmap"] = str(figure)
        results.append(entry)
        if not args.json:
            print(_plain(entry, decoders, bool(args.beam)), flush=True)
    if args.json:
        json.dump(results, sys.stdout, indent=None if len(results) > 1 else 1)
        print()
    return 1 if failed else 0


def domain_json(verdict) -> dict:
    """A DomainVerdict as JSON; without a domain check (threshold infinite) score and threshold are
    null."""
    finite = math.isfinite(verdict.threshold)
    return {
        "in_domain": verdict.in_domain,
        "score": round(verdict.score, 4) if finite else None,
        "threshold": round(verdict.threshold, 4) if finite else None,
    }


def _domain_line(domain: dict) -> str:
    if domain["threshold"] is None:
        return "no domain check in these weights"
    if domain["in_domain"]:
        return (
            f"like the training pictures (score {domain['score']:.2f} <= {domain['threshold']:.2f})"
        )
    return (
        f"OUTSIDE the training domain (score {domain['score']:.2f} > {domain['threshold']:.2f}): "
        "the captions below are likely made up"
    )


def _plain(entry: dict, decoders: list[str], beam: bool) -> str:
    lines = [
        entry["image"],
        f"  {'domain':9s} {_domain_line(entry['domain'])}",
        f"  {'imagenet':9s} "
        + (
            ", ".join(f"{label['label']} {label['p']:.0%}" for label in entry["imagenet"])
            or "no ImageNet labels with this encoder"
        ),
    ]
    for kind in decoders:
        part = entry[kind]
        lines.append(
            f"  {kind:9s} {'beam' if beam else 'greedy'}: "
            f"{part['beam'] if beam else part['greedy']}"
        )
        lines += [f"  {'':9s} {i}. {text}" for i, text in enumerate(part["samples"], start=1)]
    if "heatmap" in entry:
        lines.append(f"  attention map: {entry['heatmap']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# train / eval / weights


def _train_config(args):
    from model.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "epochs" in values:
        values.setdefault("attention_epochs", values["epochs"])
    return TrainConfig(**values)


def train_command(args) -> int:
    from model.train import run

    config = _train_config(args)
    results = run(config)
    for kind, report in results["decoders"].items():
        best = {k: v for k, v in report.items() if k.startswith("best")}
        print(
            f"{kind}: {best} in {report['seconds']:.0f}s -> {Path(config.out_dir) / (kind + '.pt')}"
        )
    if config.data == "scenes":
        print(
            f"no domain check yet: python -m model domain-fit --weights {config.out_dir} adds one "
            "(make weights does both)"
        )
    return 0


def eval_command(args) -> int:
    from model.captioner import Captioner
    from model.evaluate import evaluate_scenes, format_table

    captioner = Captioner.load(args.weights, device=args.device)
    results = evaluate_scenes(
        captioner, count=args.count, log=lambda line: print(line, file=sys.stderr)
    )
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    if args.card:
        from model.card import rescore_card

        if args.count != 1000:
            raise SystemExit("--card needs the card's 1,000 scenes per render (--count 1000)")
        print(f"rewrote {rescore_card(Path(args.weights), results)}", file=sys.stderr)
    return 0


def weights_command(args) -> int:
    from model.card import build_weights

    build_weights(_train_config(args), eval_count=args.count)
    return 0


def domain_fit_command(args) -> int:
    """(Re)fit weights/domain.pt from the weights as they are: the decoders are not touched."""
    from model.captioner import Captioner
    from model.card import update_card
    from model.domain import DOMAIN_FILE, fit_domain

    weights = Path(args.weights)
    captioner = Captioner.load(weights, device=args.device)
    check = fit_domain(
        captioner,
        fit_scenes=args.fit_scenes,
        calibration_scenes=args.calibration_scenes,
        report_scenes=args.report_scenes,
        log=lambda line: print(line, file=sys.stderr),
    )
    check.save(weights / DOMAIN_FILE)
    if (weights / "MODEL_CARD.md").exists():
        update_card(weights)
    print(
        f"{weights / DOMAIN_FILE}: threshold {check.threshold:.3f}; rejected "
        f"{check.info['test_rejected']} "
        f"of held-out scenes, {check.info['nonscenes_rejected']} of non-scenes"
    )
    return 0


def bench_command(args) -> int:
    from model.bench import main as bench_main

    return bench_main(args.weights, repeats=args.repeats)


# ----------------------------------------------------------------------------------------------


def train_options() -> list[tuple[str, type, str, list | None]]:
    """(field, type, help, choices) of each TrainConfig field of a plain type, the help being the
    field's comment in the class's source (with its continuation lines); a comment that starts
    `a | b | c` lists the choices."""
    from model.train import TrainConfig

    source = textwrap.dedent(inspect.getsource(TrainConfig))
    comments = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (
                token.start[1],
                token.string.lstrip("#").strip(),
                token.line.strip(),
            )
    helps = {}
    (class_def,) = ast.parse(source).body
    assert isinstance(class_def, ast.ClassDef)
    for node in class_def.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row, parts = node.lineno, []
        if row in comments and not comments[row][2].startswith("#"):
            column, text, _ = comments[row]
            parts.append(text)
            # continuation: comment-only lines below, starting in the same column
            while (
                row + 1 in comments
                and comments[row + 1][0] == column
                and comments[row + 1][2].startswith("#")
            ):
                row += 1
                parts.append(comments[row][1])
        helps[node.target.id] = " ".join(parts)
    options = []
    for f in fields(TrainConfig):
        kind = {"str": str, "int": int, "float": float}.get(
            f.type if isinstance(f.type, str) else f.type.__name__
        )
        if kind is None:  # tuples and dicts: the config's business, not the command line's
            continue
        text, choices = (
            helps.get(f.name, "").replace("%", "%%"),
            None,
        )  # argparse formats help with %
        head, _, rest = text.partition(":")
        if " | " in head and all(
            word.isidentifier() or word.isdigit() for word in head.split(" | ")
        ):
            choices = [kind(word) for word in head.split(" | ")]
            text = rest.strip()
        options.append((f.name, kind, text, choices))
    return options


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field (model/train.py), its comment the help; unset options keep
    the config's defaults."""
    from model.train import TrainConfig

    defaults = TrainConfig()
    for name, kind, text, choices in train_options():
        default = getattr(defaults, name)
        shown = f"default {default}" if default != "" else "no default"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            choices=choices,
            help=f"{text} ({shown})" if text else f"({shown})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description="Image captioning engine")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("caption", help="caption image files")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--decoder", choices=["both", "baseline", "attention"], default="both")
    p.add_argument(
        "--samples", type=int, default=3, help="sampled captions per decoder (0 for none)"
    )
    p.add_argument("--temperature", type=_temperature, default=1.0)
    p.add_argument("--top-k", dest="top_k", type=_positive_int, default=None)
    p.add_argument(
        "--beam", type=_positive_int, default=None, metavar="K", help="beam search of width K"
    )
    p.add_argument("--seed", type=int, default=None, help="make the samples reproducible")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--heatmap-dir", help="write each image's attention figure (JPEG) here")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(run=caption_command)

    p = commands.add_parser("train", help="train the decoders (encodes into an HDF5 cache first)")
    _add_train_arguments(p)
    p.set_defaults(run=train_command)

    p = commands.add_parser("eval", help="score the weights on held-out scenes")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--card",
        action="store_true",
        help="write the scores to scores.json and the model card (after a serving-path change)",
    )
    p.set_defaults(run=eval_command)

    p = commands.add_parser(
        "weights", help="train + evaluate + write the model card (make weights)"
    )
    _add_train_arguments(p)
    p.add_argument("--count", type=int, default=1000, help="held-out scenes for the card")
    p.set_defaults(run=weights_command)

    p = commands.add_parser(
        "domain-fit",
        help="(re)fit the domain check (domain.pt) of existing scene weights, "
        "without retraining: render, encode, fit, calibrate, update the card",
    )
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument(
        "--fit-scenes",
        dest="fit_scenes",
        type=_positive_int,
        default=3000,
        help="training renders the check is fitted on",
    )
    p.add_argument(
        "--calibration-scenes",
        dest="calibration_scenes",
        type=_positive_int,
        default=100,
        help="held-out scenes per render condition for the threshold",
    )
    p.add_argument(
        "--report-scenes",
        dest="report_scenes",
        type=_positive_int,
        default=300,
        help="held-out test scenes per reported condition for the card's rates",
    )
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(run=domain_fit_command)

    p = commands.add_parser("bench", help="latency, throughput and memory of the bundled model")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS_DIR))
    p.add_argument("--repeats", type=int, default=50)
    p.set_defaults(run=bench_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
