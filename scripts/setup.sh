#!/usr/bin/env bash
# Sets up a fresh machine for this project, and does nothing that is already done:
#  - Debian packages redis-server and dataset-fashion-mnist (installed when root, named otherwise)
#  - .venv/ with the pinned dependencies and this project installed editable with its dev extra
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
FMNIST_FILE=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

missing_debs=()
command -v redis-server >/dev/null 2>&1 || missing_debs+=(redis-server)
[ -f "$FMNIST_FILE" ] || missing_debs+=(dataset-fashion-mnist)
if [ ${#missing_debs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages: ${missing_debs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing_debs[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${missing_debs[*]}" >&2
        echo "setup: run as root:  sudo apt-get install -y ${missing_debs[*]}" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp="$VENV/.oal-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python dependencies into $VENV (first time: about 3 minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import oal_shared, oal_synth, oal_trainer, torch, diffusers" \
        || { echo "setup: the install did not complete; see the pip output above" >&2; exit 1; }
    rm -f "$VENV"/.oal-installed-*
    touch "$stamp"
fi
echo "setup: ready ($VENV, $(basename "$stamp"))"
