from aiogram import Router
from aiogram.exceptions import TelegramAPIError
from aiogram.types import CallbackQuery, Message

from bot import texts
from bot.log import get_logger
from bot.middlewares import INFERENCE_FLAG
from bot.photos import NotAnImage, photo_of
from bot.service import CaptionService
from bot.texts import ATTENTION_MAP, CAPTION_ANYWAY, MORE_SAMPLES, PhotoAction

log = get_logger("bot.buttons")
router = Router(name="buttons")


@router.callback_query(PhotoAction.filter(), flags={INFERENCE_FLAG: True})
async def photo_button(
    query: CallbackQuery, callback_data: PhotoAction, service: CaptionService
) -> None:
    message = query.message if isinstance(query.message, Message) else None
    if message is None:  # too old: Telegram no longer says which message it was
        await _ack(query, texts.PHOTO_GONE, alert=True)
        return
    photo = await service.photos.by_key(message.chat.id, callback_data.key)
    if photo is None:
        # The bot restarted since: the button's message replies to the photo itself.
        try:
            candidate = photo_of(message.reply_to_message)
        except NotAnImage:
            candidate = None
        if candidate is not None and candidate.key == callback_data.key:
            photo = candidate
    if photo is None:
        await _ack(query, texts.PHOTO_GONE, alert=True)
        return
    # Answer at once so the client stops its spinner; the result comes as a message.
    if callback_data.action == MORE_SAMPLES:
        await _ack(query, "Sampling...")
        n = max(1, service.settings.default_samples)
        await service.samples(message.chat.id, message.message_id, photo, n, 1.0)
    elif callback_data.action == ATTENTION_MAP:
        await _ack(query, "Drawing the attention map...")
        await service.attention(message.chat.id, message.message_id, photo)
    elif callback_data.action == CAPTION_ANYWAY:
        await _ack(query, "Captioning...")
        # Answered like a photo: a reply to the photo itself, with the photo's buttons.
        photo_message = message.reply_to_message or message
        await service.caption(message.chat.id, photo_message.message_id, photo, anyway=True)
    else:
        await _ack(query, None)


async def _ack(query: CallbackQuery, text: str | None, alert: bool = False) -> None:
    try:
        await query.answer(text, show_alert=alert)
    except TelegramAPIError as error:  # the press still gets its result message
        log.warning("callback_not_answered", error=f"{type(error).__name__}: {error}")
