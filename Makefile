# Two commands do all the set-up on a fresh machine with Python 3.10+ and make:
#   make train   # install the locked environment, then train the default experiment (CPU, minutes)
#   make test    # install the locked environment, then run the test suite
# Extra arguments go through ARGS, e.g. make train ARGS="experiment=toy2d".

PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
PYTEST_ARGS ?= -n 2
ARGS ?=

.PHONY: uv install train sample test test-slow lint typecheck docker-lint clean

uv:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || \
		$(PYTHON) -m pip install --quiet uv

install: uv
	$(UV) sync --frozen

train: install
	$(UV) run --frozen dlab-train $(ARGS)

sample: install
	$(UV) run --frozen dlab-sample $(ARGS)

test: install
	$(UV) run --frozen pytest $(PYTEST_ARGS)

test-slow: install
	$(UV) run --frozen pytest $(PYTEST_ARGS) -m slow

lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen mypy

docker-lint: install
	$(UV) run --frozen hadolint Dockerfile

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
