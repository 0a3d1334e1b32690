from aiogram import Router
from aiogram.filters import Command, CommandStart
from aiogram.types import Message

from bot import texts
from bot.service import CaptionService

router = Router(name="start")


@router.message(CommandStart())
@router.message(Command("help"))
async def start_or_help(message: Message, service: CaptionService) -> None:
    settings = service.settings
    await service.tell(
        message.chat.id,
        None,
        texts.help_text(
            default_samples=settings.default_samples,
            max_samples=settings.max_samples,
            readme_url=settings.readme_url,
        ),
    )
