"""The runnable examples of examples/ run as the README says, on this machine's CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from spawn import GLOO_AVAILABLE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")
def test_distributed_example_trains_checkpoints_and_resumes_on_four_ranks():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                           "examples/distributed.py", "--steps", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 steps on a 2 x 2 (data x tensor) mesh" in done.stdout
    going_on, from_checkpoint = re.search(r"loss (\S+) going on, (\S+) from the checkpoint", done.stdout).groups()
    assert going_on == from_checkpoint  # the checkpoint holds everything the run needs


def test_train_gpt_example_learns():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "examples/train_gpt.py", "--steps", "20", "--batch-size", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(loss) for loss in re.findall(r"val loss (\S+)", done.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.5, done.stdout  # from ~ln(256) = 5.5 towards bytes' entropy
