"""Everything the bot says, in one place (plain text: no parse mode to escape for)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiogram.filters.callback_data import CallbackData
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from bot.photos import SUPPORTED_FORMATS

if TYPE_CHECKING:
    from bot.worker import AttentionResult, CaptionResult
    from model.captioner import Label

COMMANDS = {
    "start": "What this bot does",
    "help": "Commands and tips",
    "sample": "N sampled captions: /sample N [temperature]",
    "attention": "Where the model looked, word by word",
}

COCO_SECTION = 'README, section "Training on real photos (COCO, Flickr8k)"'


def help_text(*, default_samples: int, max_samples: int, readme_url: str | None) -> str:
    where = readme_url or COCO_SECTION
    return "\n".join(
        [
            "I describe images in a sentence.",
            "",
            f"Send a photo (or an image file: {SUPPORTED_FORMATS}; of a GIF, its first frame) "
            "and I reply with the attention decoder's caption, the baseline decoder's "
            f"caption and {default_samples} sampled captions.",
            "",
            "Commands (reply to a photo, put them in a photo's caption, or use them on your "
            "latest photo):",
            f"/sample N [T] - N sampled captions (1-{max_samples}), optional temperature T "
            "in (0, 2], default 1",
            "/attention - a picture of where the model looked for each word",
            "/help - this message",
            "",
            "Honest note: the bundled model was trained on synthetic scenes of coloured "
            "shapes (circles, squares, stars... on plain backgrounds), so that is what it "
            "describes well. Send it anything else and I say so, with what my ImageNet-trained "
            f"encoder sees instead. To caption real photos, retrain it on COCO: see {where}.",
        ]
    )


SEND_A_PHOTO = "Send me a photo first, then I can do that (or reply to a photo with the command)."
TEXT_HINT = "Send me a photo and I'll describe it. /help lists the commands."
NOT_ALLOWED = "Sorry, this is a private bot."
QUEUE_FULL = "I'm busy with a lot of images right now. Please try again in a few seconds."
RESTARTING = (
    "I'm restarting right now and couldn't finish this one. Please send it again in a minute."
)
INFERENCE_FAILED = (
    "Sorry, something went wrong while captioning this image. Please try another one."
)
DOWNLOAD_FAILED = "I couldn't download that file from Telegram. Please send it again."
PHOTO_GONE = "I no longer have that photo. Please send it again."
JOB_GAVE_UP = (
    "Sorry, I tried several times and couldn't finish this one. Please send it again later."
)
NOT_AN_IMAGE = (
    f"That file isn't an image I can read. Send a photo, or an image file ({SUPPORTED_FORMATS})."
)


def sample_usage(max_samples: int) -> str:
    return (
        f"Usage: /sample N [T] - N sampled captions, 1 <= N <= {max_samples}; optional "
        "temperature T with 0 < T <= 2 (default 1). Example: /sample 5 0.7"
    )


def bad_image(reason: str) -> str:
    return f"I can't use this image: {reason}."


def _megabytes(size: int) -> str:
    mb = size / 1_000_000
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def too_large(size: int | None, limit: int) -> str:
    """`size=None`: the real size is unknown, only that it exceeds `limit`."""
    what = f"{_megabytes(size)}, " if size is not None else ""
    return (
        f"That file is too large ({what}the limit is {_megabytes(limit)}). "
        "Please send a smaller image."
    )


def rate_limited(per_minute: int, retry_in_s: int) -> str:
    return (
        f"You're sending requests quickly - I can take {per_minute} a minute per person. "
        f"Please try again in {retry_in_s} s."
    )


EMPTY_CAPTION = "(no words)"


def shown(caption: str) -> str:
    """A decoder may stop at once and return no words; show that instead of a blank."""
    return caption.strip() or EMPTY_CAPTION


def numbered(captions: list[str]) -> str:
    return "\n".join(f"{i}. {shown(text)}" for i, text in enumerate(captions, 1))


def caption_reply(headline: str, baseline: str, samples: list[str]) -> str:
    lines = [shown(headline), "", f"Baseline decoder: {shown(baseline)}"]
    if samples:
        lines += ["", "Sampled:", numbered(samples)]
    return "\n".join(lines)


def samples_reply(samples: list[str], temperature: float, *, outside: bool = False) -> str:
    text = f"{len(samples)} sampled captions (temperature {temperature:g}):\n{numbered(samples)}"
    return marked(text, outside)


# ---- photos outside the domain the decoders were trained on ---------------------------

OUTSIDE_DOMAIN = (
    "This image is outside my training domain (coloured-shape scenes), so what I write "
    "about it is probably made up."
)


def marked(text: str, outside: bool) -> str:
    """`text`, led by the out-of-domain line when `outside`."""
    return "\n\n".join(part for part in (OUTSIDE_DOMAIN if outside else "", text) if part)


def _percent(p: float) -> str:
    return f"{p:.0%}" if p >= 0.01 else "<1%"


def what_the_encoder_sees(labels: list[Label]) -> str:
    # The first label always; the others only when they are worth naming.
    named = [labels[0], *(label for label in labels[1:] if label.p >= 0.01)] if labels else []
    if not named:
        return "My ImageNet-trained encoder can't name it either."
    return (
        "My ImageNet-trained encoder sees: "
        + ", ".join(f"{label.label} ({_percent(label.p)})" for label in named)
        + "."
    )


def out_of_domain_reply(labels: list[Label]) -> str:
    return "\n\n".join(
        [
            "This doesn't look like the coloured-shape scenes my captioner was trained on, so "
            "its caption would be made up.",
            what_the_encoder_sees(labels),
            "Press Caption anyway to see what it writes.",
        ]
    )


class PhotoAction(CallbackData, prefix="p"):
    """Button payload: what to do and which photo (its file_unique_id), < 64 bytes."""

    action: str  # "more" | "attn"
    key: str


MORE_SAMPLES = "more"
ATTENTION_MAP = "attn"
CAPTION_ANYWAY = "any"
BUTTONS = {
    MORE_SAMPLES: "More samples",
    ATTENTION_MAP: "Attention map",
    CAPTION_ANYWAY: "Caption anyway",
}


def _keyboard(key: str, *actions: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(
                    text=BUTTONS[action], callback_data=PhotoAction(action=action, key=key).pack()
                )
                for action in actions
            ]
        ]
    )


def photo_keyboard(key: str) -> InlineKeyboardMarkup:
    return _keyboard(key, MORE_SAMPLES, ATTENTION_MAP)


def out_of_domain_keyboard(key: str) -> InlineKeyboardMarkup:
    return _keyboard(key, CAPTION_ANYWAY, ATTENTION_MAP)


def photo_reply(result: CaptionResult, key: str) -> tuple[str, InlineKeyboardMarkup]:
    """The reply to a photo and its buttons: the captions (marked when the photo is
    outside the domain), or, when it wasn't captioned, what the encoder sees."""
    if not result.captioned:
        return out_of_domain_reply(result.labels or []), out_of_domain_keyboard(key)
    text = caption_reply(result.headline, result.baseline, result.samples)
    return marked(text, result.out_of_domain), photo_keyboard(key)


def attention_caption(result: AttentionResult) -> str:
    return marked(result.caption, result.out_of_domain)
