"""Work on whole tensors in torch ops, a chunk of elements at a time: the conversions of int8 codes and master
remainders (fused_optim/int8_moments.py, fused_optim/master_remainder.py) and the torch backend's updates
(fused_optim/ops/_library.py: pieces). Their int64 and float64 temporaries take 20 to 60 bytes an element: over a
whole embedding at once, gigabytes beside a state of a few bytes a param, on a load, a `torch_state_dict()` or a
step."""

from __future__ import annotations

from typing import Iterator

CHUNK = 1 << 20  # elements converted at a time (a multiple of int8_moments.BLOCK): temporaries of about 60 MB at most


def chunks(numel: int) -> Iterator[slice]:
    """Slices that cover `numel` elements, CHUNK at a time."""
    return (slice(start, min(start + CHUNK, numel)) for start in range(0, numel, CHUNK))
