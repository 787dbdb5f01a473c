#!/usr/bin/env bash
# Create .venv and install btx into it (editable, with the test and plots extras).
#
# Idempotent and fast when already done: pip is skipped entirely when .venv holds an install made
# from the current pyproject.toml and constraints.txt (a stamp file records their hash).
#
# torch: on a machine without an NVIDIA GPU (no working `nvidia-smi`), torch==2.13.0 (CPU build,
# pinned in constraints.txt) is installed first when .venv has no torch. On a GPU machine torch is
# installed unpinned (set BTX_TORCH_SPEC, e.g. "torch==2.13.0", to choose). Either way, every later
# pip call is constrained to the torch that is installed, so pip never re-resolves torch.
#
# Environment: PYTHON (interpreter for a new venv, default python3), BTX_TORCH_SPEC (see above),
# BTX_SETUP_FORCE=1 (ignore the stamp and run pip again).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.btx-install-stamp"

stamp_value() {
    cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1
}

if [[ "${BTX_SETUP_FORCE:-0}" != 1 && -x "$PY" && -x "$VENV/bin/btx" && -f "$STAMP" \
      && "$(cat "$STAMP")" == "$(stamp_value)" ]]; then
    exit 0
fi

if [[ ! -x "$PY" ]]; then
    "${PYTHON:-python3}" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "setup.sh: btx needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
    echo "setup.sh: creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi

PIP=("$PY" -m pip --disable-pip-version-check -q)

have_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

has_torch() {
    "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'
}

if ! has_torch; then
    if have_gpu; then
        spec="${BTX_TORCH_SPEC:-torch}"
        echo "setup.sh: NVIDIA GPU found; installing $spec (no CPU pin)"
        # shellcheck disable=SC2086  # the spec may carry pip options, e.g. an --index-url
        "${PIP[@]}" install $spec
    else
        echo "setup.sh: no NVIDIA GPU; installing the CPU torch pinned in constraints.txt"
        "${PIP[@]}" install -c constraints.txt torch
    fi
fi

# Constraints for the rest: constraints.txt without its torch line, plus the torch now installed.
torch_version="$("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
pins="$VENV/.btx-constraints.txt"
{ grep -viE '^[[:space:]]*torch[[:space:]]*([=<>!~;[]|$)' constraints.txt || true; echo "torch==$torch_version"; } > "$pins"

echo "setup.sh: installing btx (editable) with extras test,plots; torch stays at $torch_version"
"${PIP[@]}" install -c "$pins" -e '.[test,plots]'

stamp_value > "$STAMP"
