"""Routers, in the order the dispatcher tries them."""

from aiogram import Router

from bot.handlers import buttons, commands, fallback, images, start


def routers() -> list[Router]:
    # Commands first: a photo whose caption is "/sample 3" is a command, not a new photo.
    return [start.router, commands.router, images.router, buttons.router, fallback.router]
