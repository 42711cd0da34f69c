#!/usr/bin/env bash
# Sets up a fresh machine for this project, and does nothing that is already done:
#  - Debian packages redis-server and dataset-fashion-mnist (installed when root, named otherwise)
#  - .venv/ with the pinned dependencies and this project installed editable:
#      scripts/setup.sh base   the project alone: what `make demo` needs
#      scripts/setup.sh dev    plus the dev extra (optional detectors, TensorBoard, timm, faiss,
#                              pytest, ruff): what `make test` and CI need
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${1:-base}
case "$PROFILE" in
    base) TARGET="." ;;
    dev) TARGET=".[dev]" ;;
    *) echo "setup: the argument must be base or dev, got '$PROFILE'" >&2; exit 2 ;;
esac

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

# Reinstall only when pyproject.toml changed since the last successful install of this profile;
# a dev install serves base too.
hash=$(sha256sum pyproject.toml | cut -c1-16)
stamp="$VENV/.oal-installed-$hash-$PROFILE"
if [ ! -f "$stamp" ] && ! { [ "$PROFILE" = base ] && [ -f "$VENV/.oal-installed-$hash-dev" ]; }; then
    echo "setup: installing Python dependencies ($PROFILE) into $VENV (first time: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e "$TARGET" 2>&1 | grep -v "^WARNING: Location" || true
    check="import oal_shared, oal_synth, oal_trainer, torch, diffusers"
    [ "$PROFILE" = dev ] && check="$check, pytest, pytorch_ood, tensorboard, timm, faiss"
    "$VENV/bin/python" -c "$check" \
        || { echo "setup: the install did not complete; see the pip output above" >&2; exit 1; }
    # Stamps of another pyproject.toml are stale; a base install leaves a current dev stamp alone.
    find "$VENV" -maxdepth 1 -name '.oal-installed-*' ! -name ".oal-installed-$hash-*" -delete
    touch "$stamp"
fi
echo "setup: ready ($VENV, $PROFILE, pyproject $hash)"
