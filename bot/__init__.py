"""Image-captioning Telegram bot (aiogram 3). Start it with `python -m bot`."""
