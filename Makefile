# mailqueue: `make dev` runs the whole embedded stack, `make test` runs the test suite.
# Both create .venv and install on first use; only Python 3.11+ and make are needed.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test test-faults audit lock bench bench-compare bench-smtp histories clean

# The first install says what it does and shows pip's progress (a few minutes, a line per package);
# updating an installed .venv after a change to pyproject.toml stays quiet.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mailqueue needs Python 3.11 or newer (set PYTHON=...)")'
	@test -x $(BIN)/python || { echo "mailqueue: creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "mailqueue: installing mailqueue and $$(grep -c '==' requirements.lock) pinned packages into $(VENV)$(if $(wildcard $(STAMP)),,: the first time takes a few minutes)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(if $(wildcard $(STAMP)),--quiet,--progress-bar off) -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Ports and options of `mailqueue dev`: make dev API_PORT=8001 TEMPORAL_PORT=7234 UI_PORT=8234 SMTP_PORT=1026
# MAIL_PORT=8026 BOUNCE_PORT=2526, and any other option in ARGS: make dev ARGS="--data-dir /tmp/mq --host 0.0.0.0".
DEV_OPTIONS = $(if $(API_PORT),--api-port $(API_PORT)) $(if $(TEMPORAL_PORT),--temporal-port $(TEMPORAL_PORT)) \
	$(if $(UI_PORT),--ui-port $(UI_PORT)) $(if $(SMTP_PORT),--smtp-port $(SMTP_PORT)) $(if $(MAIL_PORT),--mail-port $(MAIL_PORT)) \
	$(if $(BOUNCE_PORT),--bounce-port $(BOUNCE_PORT)) $(ARGS)

dev: $(STAMP)
	$(strip $(BIN)/mailqueue dev $(DEV_OPTIONS))

# The catcher's browser test renders mail with Debian's chromium: installed here (apt-get, as root) when
# /usr/bin/chromium is missing. If that fails the suite still runs, and that test fails saying why.
test: $(STAMP)
	$(BIN)/python -m devstack.audit
	-@$(BIN)/python -m devstack.browser
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

# Every phase, then the bare workflow-per-email floor on the same server: project / floor for throughput and CPU per email.
bench: $(STAMP)
	$(BIN)/python bench/bench.py --floor

# Two revisions' phase B interleaved (A B A B) on this machine: make bench-compare A=HEAD~1 B=HEAD [ROUNDS=2] [ARGS="--emails 300"]
ROUNDS ?= 2
bench-compare: $(STAMP)
	@test -n "$(A)" -a -n "$(B)" || { echo 'usage: make bench-compare A=<rev> B=<rev> [ROUNDS=2] [ARGS="--emails 300"]'; exit 2; }
	$(BIN)/python bench/compare.py '$(A)' '$(B)' --rounds $(ROUNDS) -- $(ARGS)

bench-smtp: $(STAMP)
	$(BIN)/python bench/smtp_bench.py

histories: $(STAMP)
	$(BIN)/python -m tests.record_histories

clean:
	rm -rf $(VENV) .mailqueue .pytest_cache
