"""Word <-> id mapping, built from training captions and saved beside the weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from model.data.datasets import tokenize

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

# Spelling: words that start with a vowel letter but a consonant sound, and the reverse.
_CONSONANT_SOUND = ("one", "once", "uni", "use", "usu", "uti", "eu", "ewe", "ufo")
_VOWEL_SOUND = ("hour", "honest", "honor", "honour", "heir")


def article_for(word: str) -> str:
    """ "an" before a vowel sound ("an orange"), else "a" ("a large", "a unicorn")."""
    vowel = word[:1] in "aeiou" and not word.startswith(_CONSONANT_SOUND)
    return "an" if vowel or word.startswith(_VOWEL_SOUND) else "a"


def with_articles(tokens: list[str]) -> list[str]:
    """The caption with every "a"/"an" agreeing with the word after it: "a orange circle" ->
    "an orange circle". One word in, one word out, so attention maps stay aligned with the words.

    The bundled scene vocabulary has no "an" (the renderer's reference captions write "a" before
    every word), so the decoders' output is spelled here, where captions are assembled."""
    return [
        article_for(tokens[i + 1]) if word in ("a", "an") and i + 1 < len(tokens) else word
        for i, word in enumerate(tokens)
    ]


# Words after which an English caption cannot have ended: articles, conjunctions, prepositions.
DANGLING = frozenset(
    "a an the and or but of to in on at by for from with into onto below above under over "  # noqa: SIM905
    "behind beside between near".split()
)


def looks_cut(tokens: list[str]) -> bool:
    """Whether a caption stops mid-phrase ("... and a"): a decoder far from its training
    pictures may end one so."""
    return bool(tokens) and tokens[-1] in DANGLING


def fold_articles(tokens: list[str]) -> list[str]:
    """ "an" -> "a": what BLEU and CIDEr compare, since the scene references never write "an"."""
    return ["a" if word == "an" else word for word in tokens]


class Vocabulary:
    def __init__(self, words: list[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.bos, self.eos, self.unk = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions, min_count: int = 1) -> Vocabulary:
        counts = Counter(word for caption in captions for word in tokenize(caption))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_len: int) -> list[int]:
        """<bos> w1 .. wn <eos>, at most max_len words."""
        ids = [self.index.get(w, self.unk) for w in tokenize(caption)[:max_len]]
        return [self.bos, *ids, self.eos]

    def decode(self, ids) -> list[str]:
        return [self.words[i] for i in ids if i not in (self.pad, self.bos, self.eos)]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.words, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(json.loads(Path(path).read_text()))
