"""Prints the development dependencies, one a line: pyproject.toml's `dev` extra (the one list), for scripts/env.sh
to install beside the torch that requirements-dev.txt pins."""

import pathlib
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        sys.exit("scripts/dev_requirements.py needs Python 3.11 or later (or `pip install tomli`).")

pyproject = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
print("\n".join(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["dev"]))
