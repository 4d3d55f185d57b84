#!/usr/bin/env bash
# Prints the path of a Python that has torch and the dev dependencies, creating it if needed.
#
# An active virtual environment (or conda env) is used as it is, with anything missing installed into it.
# Otherwise a venv under $HOME/.cache/fused_optim/ is made, keyed by the dependency list and the Python version,
# so repeated runs (CI included) reuse the 5.5 GB torch install and a changed requirement makes a new one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/requirements-dev.txt"

if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
    python="$(command -v python)"
else
    base_python="${PYTHON:-python3}"
    key="$( (cat "$requirements"; "$base_python" --version) | sha256sum | cut -c1-16)"
    venv="${FUSED_OPTIM_VENV:-$HOME/.cache/fused_optim/venv-$key}"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "creating $venv" >&2
        rm -rf "$venv.partial"
        "$base_python" -m venv "$venv.partial"
        "$venv.partial/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
        "$venv.partial/bin/python" -m pip install -q -r "$requirements" >&2
        # Rename only once complete, so an interrupted install is never mistaken for a finished one.
        mv "$venv.partial" "$venv"
        # A venv records its own path in its scripts; the rename left them pointing at .partial.
        sed -i "s#$venv.partial#$venv#g" "$venv"/bin/* 2>/dev/null || true
    fi
    python="$venv/bin/python"
fi

# Install whatever is missing (quietly; a no-op when all is present).
if ! "$python" -c "import torch, pytest, hypothesis, rich, ninja" 2>/dev/null; then
    "$python" -m pip install -q -r "$requirements" >&2
fi
echo "$python"
