from aiogram import Router
from aiogram.types import Message

from bot import texts
from bot.middlewares import INFERENCE_FLAG
from bot.photos import NotAnImage, photo_of
from bot.service import CaptionService

router = Router(name="images")


async def carries_image(message: Message) -> bool:
    """A photo, or a document (the handler tells the non-image ones apart).

    A coroutine on purpose: aiogram runs a plain function or an `F` filter in a worker thread
    (asyncio.to_thread), a thread hop for every message this router sees."""
    return bool(message.photo) or message.document is not None


@router.message(carries_image, flags={INFERENCE_FLAG: True})
async def image(message: Message, service: CaptionService) -> None:
    try:
        photo = photo_of(message)
    except NotAnImage:
        await service.tell(message.chat.id, message.message_id, texts.NOT_AN_IMAGE)
        return
    assert photo is not None  # the filter lets only photos and documents in
    await service.photos.remember(message.chat.id, message.message_id, photo)
    await service.caption(message.chat.id, message.message_id, photo)
