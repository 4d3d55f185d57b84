"""scripts/step_snapshot.py, the byte-for-byte A/B of two builds: a snapshot is reproducible in one build, whatever
the state of torch's generator (each configuration seeds it, and the optimizers draw their rounding seeds from it),
and `compare` counts every differing byte, a flipped sign bit too."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "step_snapshot.py"


@pytest.fixture(scope="module")
def step_snapshot():
    spec = importlib.util.spec_from_file_location("step_snapshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_snapshot_is_reproducible_and_covers_every_mode(step_snapshot, monkeypatch):
    monkeypatch.setattr(step_snapshot, "SIZES", (3, 130))  # a partial block and a tail, quickly
    first = step_snapshot.snapshot()
    torch.manual_seed(12345)  # another process's generator: the optimizers' rounding seeds come from it
    second = step_snapshot.snapshot()
    assert step_snapshot.compare(first, second) == 0
    assert len(first) == 114
    assert any("'moments': 'int8'" in key and "'master_weights': 24" in key for key in first)
    stepped = first[next(iter(first))]
    assert all(torch.isfinite(t.float()).any() for t in stepped[:2])  # params stepped, not all NaN


def test_compare_counts_each_differing_byte(step_snapshot):
    a = {"x": [torch.tensor([1.0, -0.0, 2.0]), torch.tensor([3], dtype=torch.int8)]}
    b = {"x": [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([3], dtype=torch.int8)]}
    assert step_snapshot.compare(a, a) == 0
    assert step_snapshot.compare(a, b) == 1  # -0 and +0: the sign byte alone
    with pytest.raises(SystemExit):
        step_snapshot.compare(a, {"y": a["x"]})
