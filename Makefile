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

# Not part of `make test`: builds every CPU image and runs the compose pipeline end to end with docker
# compose or podman (many minutes; docs/DEPLOY.md). OAL_CHECK_GPU=1 also builds the GPU images.
.PHONY: compose-check
compose-check:
	@bash scripts/compose-check.sh
