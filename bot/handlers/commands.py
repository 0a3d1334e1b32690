from aiogram import Router
from aiogram.filters import Command, CommandObject
from aiogram.types import Message

from bot import texts
from bot.middlewares import INFERENCE_FLAG
from bot.photos import NotAnImage, PhotoRef
from bot.service import CaptionService, parse_sample_args

router = Router(name="commands")


@router.message(Command("sample"), flags={INFERENCE_FLAG: True})
async def sample(message: Message, command: CommandObject, service: CaptionService) -> None:
    parsed = parse_sample_args(command.args, service.settings.max_samples)
    if parsed is None:
        usage = texts.sample_usage(service.settings.max_samples)
        await service.tell(message.chat.id, message.message_id, usage)
        return
    photo = await _photo_for(message, service)
    if photo is not None:
        await service.samples(message.chat.id, message.message_id, photo, *parsed)


@router.message(Command("attention"), flags={INFERENCE_FLAG: True})
async def attention(message: Message, service: CaptionService) -> None:
    photo = await _photo_for(message, service)
    if photo is not None:
        await service.attention(message.chat.id, message.message_id, photo)


async def _photo_for(message: Message, service: CaptionService) -> PhotoRef | None:
    """The photo the command means, replying with the reason when there is none."""
    try:
        photo = await service.photos.resolve(message)
    except NotAnImage:
        await service.tell(message.chat.id, message.message_id, texts.NOT_AN_IMAGE)
        return None
    if photo is None:
        await service.tell(message.chat.id, message.message_id, texts.SEND_A_PHOTO)
        return None
    if message.photo or message.document:
        # The command came as this photo's caption: it is now the chat's latest photo.
        await service.photos.remember(message.chat.id, message.message_id, photo)
    return photo
