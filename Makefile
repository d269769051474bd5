# mailqueue: `make dev` runs the whole embedded stack, `make test` runs the test suite.
# Both create .venv and install on first use; only Python 3.11+ and make are needed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test test-faults audit lock bench bench-smtp histories clean

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mailqueue needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/mailqueue dev

test: $(STAMP)
	$(BIN)/python -m devstack.audit
	$(BIN)/python -m pytest

test-faults: $(STAMP)
	$(BIN)/python -m pytest -s -m faults

# Known vulnerabilities in requirements.lock (says so, and passes, when the database is unreachable).
audit: $(STAMP)
	$(BIN)/python -m devstack.audit

# Rewrite requirements.lock from what .venv holds (after changing pyproject.toml and make install).
lock: $(STAMP)
	@{ sed -n '1,2p' requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e '; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

bench: $(STAMP)
	$(BIN)/python bench/bench.py

bench-smtp: $(STAMP)
	$(BIN)/python bench/smtp_bench.py

histories: $(STAMP)
	$(BIN)/python -m tests.record_histories

clean:
	rm -rf $(VENV) .mailqueue .pytest_cache
