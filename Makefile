# Two entry points for a fresh clone (README.md): `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,cpu]'
	touch $@

serve: $(VENV)/.installed
	$(BIN)/compacs serve

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The test setup installs dcmtk, orthanc and orthanc-gdcm with apt-get when missing.
test: $(VENV)/.installed lint
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/ingest.py
