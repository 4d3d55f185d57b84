"""The CPU bandwidth roof kernel (fused_optim.ops.triad): a = b + s * c, with non-temporal stores after an aligned
head and a scalar tail, so sizes around the vector width and a misaligned output are the cases that matter."""

import pytest
import torch

from fused_optim import backends
from fused_optim.ops.triad import triad_

pytestmark = pytest.mark.skipif(backends()["extensions"]["cpu"] is not None, reason="CPU extension not built")


@pytest.mark.parametrize("n", [0, 1, 15, 17, 1023, 200_003])
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_triad_matches_torch(n, offset):
    b, c = torch.randn(n), torch.randn(n)
    out = torch.full((n + offset,), float("nan"))[offset:]  # poisoned, and misaligned by `offset` floats
    triad_(out, b, c, 2.5)
    torch.testing.assert_close(out, b + 2.5 * c, rtol=0, atol=1e-6)


def test_triad_rejects_other_dtypes():
    x = torch.randn(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        triad_(x, x, x, 1.0)
