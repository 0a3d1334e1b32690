# The two commands that matter: `make run` (the bot) and `make test` (everything, from nothing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test run bench eval weights browser clean

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

test: $(STAMP) browser
	$(PY) -m pytest

run: $(STAMP)
	$(PY) -m bot

bench: $(STAMP)
	$(PY) -m model bench
	$(PY) bench/bot_bench.py

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
