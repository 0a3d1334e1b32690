# Image-captioning Telegram bot, CPU only.
#   docker build -t captionbot .        (weights/ must hold the trained decoders)
#   docker compose up -d                (see docker-compose.yml and .env.example)
#
# Stages: `build` installs the pinned dependencies with torch, `bundle` builds the serving bundle
# of weights/ with it, `serving` drops torch; the image keeps the bundle and runs without torch.
#
# Build arguments (the defaults are what a normal build wants):
#   BASE_IMAGE       python:3.11-slim; any Debian-like image with Python 3.11 and its venv module
#   TORCH_INDEX_URL  where torch comes from: the PyTorch CPU index (the PyPI wheels bundle CUDA)
#   PYPI_INDEX_URL   where every other wheel comes from
#   WHEELS           a folder in the build context whose wheels pip takes first (docker/wheels,
#                    empty in the repository). Offline: put every wheel there and pass
#                    --build-arg TORCH_INDEX_URL= --build-arg PYPI_INDEX_URL= (empty: no index)
#   TORCH_VERSION    pinned, like every other runtime dependency (docker/requirements.txt)
ARG BASE_IMAGE=python:3.11-slim

# ---- build: a virtual environment with the pinned dependencies --------------------------
FROM ${BASE_IMAGE} AS build
LABEL org.opencontainers.image.title=captionbot
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYPI_INDEX_URL=https://pypi.org/simple
ARG WHEELS=docker/wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A virtual environment: Debian's own Python refuses pip installs into the system (PEP 668).
RUN python3 -m venv /opt/venv
COPY ${WHEELS}/ /wheels/

# torch first, alone, from its own index (a layer that stays cached). Only torch's import-time
# parts are kept: its C++ headers, test binaries and test data (~190 MB) are not used here.
RUN index() { if [ -n "$1" ]; then echo "--index-url $1"; else echo "--no-index"; fi; } \
    && /opt/venv/bin/pip install --no-deps --find-links /wheels $(index "$TORCH_INDEX_URL") \
        "torch==${TORCH_VERSION}" \
    && torch=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch \
    && rm -rf "$torch/include" "$torch/test" "$torch/share/cmake" \
    && find "$torch/bin" -type f ! -name torch_shm_manager -delete

# The other dependencies, every version pinned; this layer stays cached until the pins change
# (not on every code edit). torch's own dependencies are among the pins; pip check proves it.
COPY docker/requirements.txt /tmp/requirements.txt
RUN index() { if [ -n "$1" ]; then echo "--index-url $1"; else echo "--no-index"; fi; } \
    && /opt/venv/bin/pip install --find-links /wheels $(index "$PYPI_INDEX_URL") \
        -r /tmp/requirements.txt "torch==${TORCH_VERSION}" \
    && /opt/venv/bin/pip check

# ---- bundle: the serving bundle, built with torch (model/bundle.py) ----------------------
# The encoder as a TFLite graph (LiteRT) and an ONNX graph, the ImageNet head as an ONNX graph
# (each checked against torch), the domain check's and the decoders' arrays: everything serving
# needs, built here once from weights/.
FROM build AS bundle
WORKDIR /app
COPY model/ model/
COPY weights/ weights/
ENV CAPTION_CACHE_DIR=/app/.cache
RUN /opt/venv/bin/python -m model.bundle --weights weights

# ---- serving: the environment without torch --------------------------------------------------
# Serving reads the bundle with numpy, LiteRT and ONNX Runtime only, so torch (about 1 GB installed on
# its own) and what only it or the ONNX exporter use leave the runtime image; pip check proves
# that what stays has every dependency. The efficientnet-lite0 wheel stays: its version is part
# of the bundle's key.
# Of LiteRT's wheel only its interpreter stays: its compiled-model API, WebGPU accelerator, NPU
# vendors' plugins and tools (40 MB) are never loaded (model/lite_encoder.py).
FROM build AS serving
RUN /opt/venv/bin/pip uninstall -y -q torch efficientnet-lite-pytorch onnxscript onnx-ir \
        sympy mpmath networkx Jinja2 MarkupSafe fsspec filelock \
    && litert=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/ai_edge_litert \
    && rm -rf "$litert/libLiteRt.so" "$litert/libLiteRtWebGpuAccelerator.so" "$litert/tools" \
        "$litert/vendors" "$litert/aot" \
    && /opt/venv/bin/pip check

# ---- the image -----------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title=captionbot \
      org.opencontainers.image.description="Image-captioning Telegram bot (CPU)"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

COPY --from=serving /opt/venv /opt/venv
WORKDIR /app

# Code, the bundled weights and their serving bundle. The image serves these weights only:
# without torch it cannot build the bundle of others (it says so at start); rebuild it instead.
COPY model/ model/
COPY bot/ bot/
COPY weights/ weights/
ENV CAPTION_CACHE_DIR=/app/.cache
COPY --from=bundle /app/.cache/ /app/.cache/
# Bytecode compiled now: the container's root filesystem is read-only at run time.
# /var/lib/captionbot: the journal of accepted updates (JOURNAL_FILE), a volume, so that a
# photo accepted but not yet answered survives the process and its container.
RUN python -m compileall -q bot model \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin captionbot \
    && mkdir -p /var/lib/captionbot && chown 10001 /var/lib/captionbot
VOLUME /var/lib/captionbot
USER 10001

# PLAYGROUND=off: in a container a missing token is an error, not a local chat page.
# INFERENCE_THREADS=2: a container sees every host core but is usually given about two.
ENV LOG_FORMAT=json \
    PLAYGROUND=off \
    WEIGHTS_DIR=/app/weights \
    DEVICE=cpu \
    HEALTH_FILE=/tmp/captionbot.health \
    JOURNAL_FILE=/var/lib/captionbot/journal.sqlite3 \
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
