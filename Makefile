# The two README commands: `make test` and `make demo`. Both set up .venv on first use
# and are no-ops for the set-up part afterwards (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/luigi --module tasks FullAblation
	@echo "Result table: $$($(BIN)/python -c 'import tasks; print(tasks.FullAblation().latest_dir() / "table1.md")')"

clean-runs:
	rm -rf runs
