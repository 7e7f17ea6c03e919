# Thin targets over scripts/ and pytest.  `make run` and `make test` do all the
# set-up on a fresh machine that has python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TESTSTAMP := $(VENV)/.test-installed
PYTEST_ARGS ?=
# The linters `make check` runs, pinned: a new release may add rules or change types.
RUFF_VERSION := 0.17.6
MYPY_VERSION := 2.4.1

.PHONY: install run test test-fast test-deps check bench bench-quick soak fuzz clean interop

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[speed,pytest]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/relay serve -c conf/laptop

$(TESTSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[speed,pytest,test]'
	touch $@

test-deps: $(TESTSTAMP)

test: $(TESTSTAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The edit-test loop: unit and property tests only (under a minute), the listener fuzzer
# with fewer examples than make test runs.
test-fast: $(TESTSTAMP)
	RELAY_FUZZ_EXAMPLES=50 $(BIN)/python -m pytest -q tests/unit tests/property $(PYTEST_ARGS)

# Only the interoperability suite: relay between private Postfix, Exim and OpenSMTPD
# instances (scripts/install-peers puts them on a Debian machine; run as root).
interop: $(TESTSTAMP)
	$(BIN)/python -m pytest -q tests/interop $(PYTEST_ARGS)

check: $(TESTSTAMP)
	$(BIN)/pip install --quiet mypy==$(MYPY_VERSION) ruff==$(RUFF_VERSION)
	$(BIN)/ruff check relay spool tests
	$(BIN)/mypy relay spool

# Every load against a private Postfix, one table in bench/results.md (tens of minutes;
# needs root for Postfix).  bench-quick: small counts, one run each, a few minutes.
bench: $(STAMP)
	$(BIN)/python scripts/bench

bench-quick: $(STAMP)
	$(BIN)/python scripts/bench --quick

soak: $(TESTSTAMP)
	$(BIN)/python scripts/spool_stress --cycles 200 --fast-sweep
	$(BIN)/python scripts/spool_stress --cycles 100 --fast-sweep --small-pool 16
	$(BIN)/python scripts/soak --messages 100000

fuzz: $(TESTSTAMP)
	RELAY_FUZZ_EXAMPLES=20000 $(BIN)/python -m pytest -q tests/property -k fuzz

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
