"""What the bot says about a photo outside the decoders' domain (bot/texts.py)."""

from __future__ import annotations

from bot import texts
from bot.worker import AttentionResult, CaptionResult
from model.captioner import DomainVerdict, Label

OUTSIDE = DomainVerdict(False, 2.4, 1.6)
INSIDE = DomainVerdict(True, 0.9, 1.6)


def test_the_honest_reply_names_what_the_encoder_sees_with_percentages():
    labels = [Label("Egyptian cat", 0.803), Label("tiger cat", 0.081), Label("tabby", 0.004)]
    text, keyboard = texts.photo_reply(CaptionResult("", "", [], OUTSIDE, labels), "key")
    assert "coloured-shape scenes my captioner was trained on" in text
    # Labels under 1% are left out, except the best one.
    assert "My ImageNet-trained encoder sees: Egyptian cat (80%), tiger cat (8%)." in text
    assert [b.text for b in keyboard.inline_keyboard[0]] == ["Caption anyway", "Attention map"]
    assert texts.what_the_encoder_sees([Label("jellyfish", 0.004)]).endswith("jellyfish (<1%).")
    assert "can't name it" in texts.what_the_encoder_sees([])


def test_captions_of_a_photo_outside_the_domain_are_marked_and_others_are_not():
    outside, keyboard = texts.photo_reply(
        CaptionResult("a red circle", "a circle", ["x"], OUTSIDE), "k"
    )
    assert outside.startswith(texts.OUTSIDE_DOMAIN + "\n\na red circle\n")
    assert [b.text for b in keyboard.inline_keyboard[0]] == ["More samples", "Attention map"]
    for verdict in (INSIDE, None):  # in the domain, or the check off
        text, _ = texts.photo_reply(CaptionResult("a red circle", "a circle", ["x"], verdict), "k")
        assert text.startswith("a red circle\n")
    assert texts.samples_reply(["a", "b"], 1.0, outside=True).startswith(texts.OUTSIDE_DOMAIN)
    assert texts.attention_caption(AttentionResult("a red circle", 3, b"", OUTSIDE)) == (
        texts.OUTSIDE_DOMAIN + "\n\na red circle"
    )
    assert texts.attention_caption(AttentionResult("", 0, b"", OUTSIDE)) == texts.OUTSIDE_DOMAIN
    assert (
        texts.attention_caption(AttentionResult("a red circle", 3, b"", INSIDE)) == "a red circle"
    )
