# The two commands of the README: `make demo` and `make test`. Each sets the machine up first:
# the demo needs only the project (`setup`), the tests its dev extra too (`setup-dev`).
.PHONY: setup setup-dev redis test lint demo clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh base

setup-dev:
	@bash scripts/setup.sh dev

redis: setup
	@bash scripts/ensure-redis.sh

lint: setup-dev
	$(VENV)/bin/ruff check .

test: setup-dev redis lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup redis
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf .run runs/demo .pytest_cache

# Not part of `make test`: builds every CPU image and runs the compose pipeline end to end with docker
# compose or podman (many minutes; docs/DEPLOY.md). OAL_CHECK_GPU=1 also builds the GPU images.
.PHONY: compose-check
compose-check:
	@bash scripts/compose-check.sh
