# The two commands that matter: `make run` (the bot) and `make test` (everything, from nothing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test run bench eval weights browser redis clean

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

test: $(STAMP) browser redis
	$(PY) -m pytest

run: $(STAMP)
	$(PY) -m bot

bench: $(STAMP) redis
	$(PY) -m model bench
	$(PY) bench/bot_bench.py
	$(PY) bench/redis_bench.py

eval: $(STAMP)
	$(PY) -m model eval

# Reproduces weights/ from nothing: render + encode the scenes, train both decoders, score them,
# write weights/MODEL_CARD.md. About 45 minutes on 2 CPU cores (44 measured, bit-identical weights).
weights: $(STAMP)
	$(PY) -m model weights --work-dir runs/scenes

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
