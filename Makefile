# Two entry points for a new user (README): `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxprune needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

.PHONY: setup demo test data reproduce
setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.pft --workdir=workdirs/pft

test: $(STAMP)
	PYTHONHASHSEED=0 $(PY) -m pytest -n 2

# Reruns every study committed under results/ and compares the numbers (~14 min on 2 idle cores);
# the previous rerun is removed first, since studies resume from the checkpoints in their workdir.
reproduce: $(STAMP)
	rm -rf workdirs/reproduce
	$(PY) -m experiments.reproduce --workdir=workdirs/reproduce

# Optional: real Fashion-MNIST (Debian package dataset-fashion-mnist) for the stability study.
data:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)
