# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
export FL_SIM_DATA ?= $(abspath $(DATA))

.PHONY: setup demo lint test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	rm -rf out/demo
	$(VENV)/bin/fl-sim run --dataset mnist --model cnn --num-clients 5 --rounds 10 --train-mode epochs --epochs 2 \
	  --batch-size 32 --lr 0.05 --momentum 0.9 --min-shard 128 --max-shard 160 --max-attack-images 160 \
	  --attack imprint --seed 0 --out out/demo
	@echo "open out/demo/gallery.html to see what the server reconstructed, round by round"

# ruff (style, imports, likely bugs) and mypy (types) over the whole tree; configured in pyproject.toml.
# Tests and benchmarks are type-checked without the bodies of unannotated test functions.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --no-check-untyped-defs --disable-error-code annotation-unchecked tests benchmarks

# The gallery tests open the page in headless Chromium. It is installed here only where that can work
# unattended: in CI (CI=true) or as root with apt-get; elsewhere this says how, and those tests fail.
test: setup lint
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$CI" = true ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then \
	  apt-get update -qq && apt-get install -y -qq chromium; \
	else \
	  echo "make test: chromium is not installed, so the gallery tests will fail. Install it first:"; \
	  echo "  sudo apt-get install chromium   (Debian/Ubuntu; or your system's package of headless Chromium)"; \
	fi
	$(PY) -m pytest -q
