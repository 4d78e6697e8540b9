# Two commands work on a brand-new machine: `make run` and `make test`.
# Both create .venv (Python 3.11, pinned torch/torchvision from constraints.txt) when it is missing.
PYTHON ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade --quiet pip
	$(VPY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VPY) -m l2vit train --config configs/train/digits_demo.yaml --overwrite

test: $(STAMP)
	$(VPY) -m pytest -q

# tests marked slow (CI runs them after `make test`); exit code 5 means none are marked
test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow || test $$? -eq 5

test-all: $(STAMP)
	$(VPY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
