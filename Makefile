# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
export FL_SIM_DATA ?= $(abspath $(DATA))

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	rm -rf out/demo
	$(VENV)/bin/fl-sim run --dataset mnist --model lenet --num-clients 4 --rounds 2 --local-steps 1 \
	  --batch-size 1 --attack idlg --iterations 200 --seed 0 --out out/demo
	@echo "open out/demo/gallery.html to see what the server reconstructed"

test: setup
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) -m pytest -q
