# Two entry points for a fresh clone (README.md): `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint bench

# The service alone; the tests add their extra (pytest, ruff, torch's CPU build for the
# training smoke test) on top.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,cpu]'
	touch $@

# The web face (DICOMweb and the status page) on WEB_PORT: [web] port is 0 by default, so
# that test nodes and several nodes on one host never fight over one port.
WEB_PORT ?= 8080
serve: $(VENV)/.installed
	$(BIN)/compacs serve --web-port $(WEB_PORT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

# The test setup installs dcmtk, orthanc and orthanc-gdcm with apt-get when missing.
# Two workers, a test file each at a time (module fixtures such as the container image are
# built once): most tests wait on peers and sockets rather than compute, so two share the
# CI machine's two cores well. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --durations=40

bench: $(VENV)/.installed-test
	$(BIN)/python bench/ingest.py
