"""What `fused-optim bench` can run: one `Benchmark` per benchmark module, each built from the same `Request`.

A benchmark module (adamw.py, cross_entropy.py, ...) declares `BENCHMARK` (adamw.py two: the adamw and adam ops):
the ops it measures, how it makes its config from the request, how many progress tasks that config takes, how it
runs, and what of its config the JSON report records. `run_benchmarks` goes through `BENCHMARKS` in order; a new
benchmark is one more entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# Total params of the main cases. CPU: 84M fp32 params move 2.35 GB a step, far past the last-level cache
# (docs/design.md: sizes that leave the caches). GPU: 256M (7.2 GB a step), far past an H100's 50 MB L2, and a step
# takes milliseconds.
DEFAULT_SIZES = {"cpu": [84_000_000], "cuda": [256_000_000]}
QUICK_SIZES = {"cpu": [4_000_000], "cuda": [16_000_000]}


@dataclass(frozen=True)
class Request:
    """What the command line asked for. `sizes`: total params (or elements) for the ops measured at sizes, None for
    each op's defaults; `cases`: adamw's and adam's; `dtypes`: the losses' and accumulate's; `shapes`: the losses'
    ({"ce": [(N, V)], "linear_ce": [(N, H, V)]}); `budget_s`: seconds spent timing each implementation."""

    ops: tuple[str, ...]
    device: torch.device
    sizes: list[int] | None = None
    cases: tuple[str, ...] | None = None
    quick: bool = False
    dtypes: tuple[str, ...] | None = None
    shapes: dict[str, list[tuple[int, ...]]] | None = None
    budget_s: float = 1.5

    def sizes_or(self, defaults: dict[str, list[int]]) -> list[int]:
        """The requested sizes, else `defaults` for this device type."""
        return list(self.sizes or defaults[self.device.type])

    def default_sizes(self) -> list[int]:
        return self.sizes_or(QUICK_SIZES if self.quick else DEFAULT_SIZES)

    def selected(self, ops: tuple[str, ...]) -> tuple[str, ...]:
        """Those of `ops` the request asks for."""
        return tuple(op for op in ops if op in self.ops)


@dataclass(frozen=True)
class Benchmark:
    ops: tuple[str, ...]
    configure: Callable[[Request], Any]
    count_tasks: Callable[[Any], int]
    run: Callable[..., list[dict[str, Any]]]  # run(config, roof_gbps=..., on_task=...) -> rows
    describe: Callable[[Any], dict[str, Any]] = lambda config: config.describe()
