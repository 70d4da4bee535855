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
	$(VENV)/bin/fl-sim attack --dataset cifar10 --model lenet --init paper --attack idlg \
	  --batch-size 1 --num-victims 8 --iterations 300 --lr 1 --seed 0 --out out/demo-attack

test: setup
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) -m pytest -q
