#!/usr/bin/env bash
# Prints the path of a Python that has torch and the dev dependencies, creating it if needed.
#
# An active virtual environment (or conda env) is used as it is: whatever it lacks of the dev dependencies is
# installed into it, but never torch (the user's torch stays; the package builds against it). Otherwise a venv
# under $HOME/.cache/fused_optim/ is made, keyed by the dependency list and the Python version, so repeated runs
# (CI included) reuse the 5.5 GB torch install and a changed requirement makes a new one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/requirements-dev.txt"  # torch

if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
    python="$(command -v python)"
    "$python" -c "import torch" 2>/dev/null || { echo "env.sh: install torch in the active environment first" >&2; exit 1; }
    dev="$("$python" "$root/scripts/dev_requirements.py")"
    # installed already? asked by distribution name (pytest-xdist's import name is xdist)
    if ! "$python" -c 'import importlib.metadata as m, sys; [m.version(d) for d in sys.argv[1:]]' $dev 2>/dev/null; then
        echo "$dev" | "$python" -m pip install -q -r /dev/stdin >&2
    fi
else
    base_python="${PYTHON:-python3}"
    dev="$("$base_python" "$root/scripts/dev_requirements.py")"
    key="$( (cat "$requirements"; echo "$dev"; "$base_python" --version) | sha256sum | cut -c1-16)"
    venv="${FUSED_OPTIM_VENV:-$HOME/.cache/fused_optim/venv-$key}"
    # The marker is written last: a venv without it is an interrupted install, and is made again from nothing.
    if [[ ! -f "$venv/.complete" ]]; then
        echo "creating $venv" >&2
        rm -rf "$venv"
        "$base_python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
        # --no-compile: no byte-compiling of every module of torch and its dependencies at install time (thousands
        # of files); Python compiles the modules it imports, on first use.
        "$venv/bin/python" -m pip install -q --no-compile -r "$requirements" >&2
        echo "$dev" | "$venv/bin/python" -m pip install -q --no-compile -r /dev/stdin >&2
        touch "$venv/.complete"
    fi
    python="$venv/bin/python"
fi
echo "$python"
