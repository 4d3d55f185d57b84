"""Lets `pytest benchmarks` collect the bench_<op>.py files (pytest's default pattern is test_*.py); a file named
on the command line is collected by pytest itself. Also the memory roof every file reports its GB/s against,
measured once per session."""

from __future__ import annotations

import pytest
import torch

from fused_optim.tools.bench import memory_roof


@pytest.fixture(scope="session")
def roof_gbps() -> float:
    """The CPU's STREAM-triad bandwidth (GB/s), measured once for the whole session."""
    return memory_roof(torch.device("cpu"), budget_s=0.5)["gbps"]


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
