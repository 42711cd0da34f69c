# The two commands of the README: `make demo` and `make test`. Each sets the machine up first.
.PHONY: setup redis test lint demo clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

redis: setup
	@bash scripts/ensure-redis.sh

lint: setup
	$(VENV)/bin/ruff check .

test: setup redis lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup redis
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf .run runs/demo .pytest_cache
