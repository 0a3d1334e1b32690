# The two commands that matter: `make run` (the bot) and `make test` (everything, from nothing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: lint test run bench bench-avx2 eval weights browser redis docker-engine docker-clean clean

# torch/torchvision are pinned to the builds this project's machines carry on disk; the project's
# own dependency ranges then accept them instead of downloading others.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Debian's Chromium for the playground's browser test. Where it cannot be installed (no root,
# no apt), the test skips itself and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "make browser: could not install chromium; the browser test will be skipped"; \
	  else echo "make browser: chromium missing and apt-get unusable; the browser test will be skipped"; fi; }

# Debian's redis-server for the QUEUE_URL tests (each starts its own, on a free port, without
# persistence). Where it cannot be installed, those tests skip themselves and say why.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	      || echo "make redis: could not install redis-server; the Redis tests will be skipped"; \
	  else echo "make redis: redis-server missing and apt-get unusable; the Redis tests will be skipped"; fi; }

# A Docker engine for the image test (tests/test_docker.py): Debian's docker.io and debootstrap
# (the base image where python:3.11-slim cannot be pulled), installed as root where apt-get works,
# Compose v2 as the `docker compose` plugin (docker/compose-v2.sh: Debian trixie's static binary,
# since bookworm ships only v1), and dockerd started when no engine answers. Otherwise the test
# skips itself and says why.
docker-engine:
	@command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null) \
	      || echo "make docker-engine: could not install docker.io; the Docker test will be skipped"; \
	  else echo "make docker-engine: dockerd missing and apt-get unusable; the Docker test will be skipped"; fi; }
	@docker compose version >/dev/null 2>&1 || { \
	  if command -v docker >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    docker/compose-v2.sh || echo "make docker-engine: could not install Compose v2; the compose tests will be skipped"; \
	  else echo "make docker-engine: Compose v2 missing and not root; the compose tests will be skipped"; fi; }
	@docker info >/dev/null 2>&1 || { \
	  if command -v dockerd >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    setsid dockerd >/tmp/dockerd.log 2>&1 < /dev/null & \
	    for i in $$(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	    docker info >/dev/null 2>&1 || echo "make docker-engine: dockerd did not start (see /tmp/dockerd.log); the Docker test will be skipped"; \
	  fi; }

# What the Docker test keeps to make its reruns short: the local base image and the layer cache.
docker-clean:
	-docker image prune -f --filter label=org.opencontainers.image.title=captionbot
	-docker image prune -f --filter label=org.opencontainers.image.title=captionbot-redis
	-docker rmi captionbot-base:bookworm-py3.11

# Style, common bugs and types: a new finding fails `make test` (and CI) before any test runs.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(STAMP) browser redis docker-engine
	$(PY) -m pytest

run: $(STAMP)
	$(PY) -m bot

bench: $(STAMP) redis
	$(PY) -m model bench
	$(PY) bench/bot_bench.py
	$(PY) bench/redis_bench.py

# The model's and the bot's benchmarks with the kernels of a CPU without AVX-512 or VNNI (issue
# 13's AMD VM), on this one: bench/avx2_only.py (needs CPUID faulting, which it checks).
bench-avx2: $(STAMP)
	$(PY) bench/avx2_only.py -- $(PY) -m model bench
	$(PY) bench/avx2_only.py -- $(PY) bench/bot_bench.py

eval: $(STAMP)
	$(PY) -m model eval

# Reproduces weights/ from nothing: render + encode the scenes, train both decoders, fit the domain
# check, score them, write weights/MODEL_CARD.md. About 45 minutes on 2 CPU cores (44 measured,
# bit-identical weights) before the domain check, which adds 37 minutes (measured with the 2 cores
# shared with other jobs), nearly all of it rendering 7,200 scenes; to refit
# only the domain check: .venv/bin/python -m model domain-fit.
weights: $(STAMP)
	$(PY) -m model weights --work-dir runs/scenes

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
