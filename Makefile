# Two commands, each doing its own set-up on a fresh machine:
#   make run    the main job on the embedded default (see README)
#   make test   the whole test suite
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[edge,flower,hf,dev]'
	touch $(STAMP)

.PHONY: setup run test
setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stamen simulate --out runs/simulate

test: $(STAMP)
	$(PY) -m pytest
