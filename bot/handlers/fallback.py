from aiogram import Router
from aiogram.types import CallbackQuery, Message

from bot import texts

router = Router(name="fallback")


@router.message()
async def anything_else(message: Message) -> None:
    await message.reply(texts.TEXT_HINT)


@router.callback_query()
async def stale_button(query: CallbackQuery) -> None:
    await query.answer()
