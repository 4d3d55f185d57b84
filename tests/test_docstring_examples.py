"""The examples in the library's docstrings run as written (doctest), so a user who copies one gets what it shows."""

import doctest
import importlib

import pytest
import torch

import fused_optim

MODULES = ["fused_optim", "fused_optim.accumulate", "fused_optim.amp", "fused_optim.clip_grad",
           "fused_optim.functional", "fused_optim.info", "fused_optim.lr_scheduler", "fused_optim.nn.loss",
           "fused_optim.optim.adam", "fused_optim.optim.lion", "fused_optim.optim.sgd", "fused_optim.reference",
           "fused_optim.tools.examples.data", "fused_optim.tools.examples.gpt", "fused_optim.tools.training.monitor",
           "fused_optim.tools.training.timing"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch, "fused_optim": fused_optim},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.attempted > 0 and result.failed == 0
