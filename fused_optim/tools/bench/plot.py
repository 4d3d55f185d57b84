"""`fused-optim bench --plot PATH`: a report's bandwidth as a PNG bar chart. One group of bars per op, case and size,
one bar per implementation (the same colour for an implementation in every group), the memory roof measured in the
same run as a horizontal line. Only rows with a GB/s are drawn: wrong, untimed and absent ones are left out (the
table and the JSON say why), and so are ops without a bytes model (linear_ce: GEMM-bound, it reports time, TFLOP/s
and peak memory); the x-axis label names the ops left out. matplotlib is imported only here, only when asked
(fused_optim/tools/_pyplot.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fused_optim.tools._pyplot import pyplot
from fused_optim.tools.bench.adamw import _human


def group_label(row: dict[str, Any]) -> str:
    """'adamw fp32 84M', 'ce bf16 8192×128256': the op, the case and the size of a row's group of bars."""
    size = row.get("shape") or (_human(row["n_params"]) if row.get("n_params") else "")
    return " ".join(part for part in (row["op"], row["case"], size) if part)


def bars(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{group label: {implementation: GB/s}} of the rows with a GB/s, in the report's order."""
    groups: dict[str, dict[str, float]] = {}
    for r in report["rows"]:
        if r.get("gbps") and r.get("correct") is not False:
            groups.setdefault(group_label(r), {})[r["impl"]] = r["gbps"]
    return groups


def undrawn_ops(report: dict[str, Any]) -> list[str]:
    """The ops of the report with no bar, each with why: 'linear_ce (no bytes model)', 'sgd (no correct timed
    row)'."""
    drawn = {r["op"] for r in report["rows"] if r.get("gbps") and r.get("correct") is not False}
    left_out: dict[str, str] = {}
    for r in report["rows"]:
        if r["op"] not in drawn:
            left_out.setdefault(r["op"], "no correct timed row" if r.get("bytes") else "no bytes model")
    return [f"{op} ({why})" for op, why in left_out.items()]


def write_plot(report: dict[str, Any], path: str) -> None:
    """Draws `report` (fused_optim.tools.bench.run_benchmarks) as a PNG at `path`. RuntimeError when matplotlib is
    missing or no row has a GB/s."""
    groups = bars(report)
    if not groups:
        raise RuntimeError("--plot: no row has a GB/s to draw (not drawn: " + ", ".join(undrawn_ops(report)) + ")")
    plt = pyplot()
    impls = list(dict.fromkeys(impl for group in groups.values() for impl in group))
    colours = {impl: plt.get_cmap("tab10" if len(impls) <= 10 else "tab20")(i) for i, impl in enumerate(impls)}
    widest = max(len(group) for group in groups.values())
    width = 0.8 / widest
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 + 0.35 * widest * len(groups)), 5), dpi=120)
    labelled: set[str] = set()
    for x, group in enumerate(groups.values()):
        left = x - width * (len(group) - 1) / 2  # each group centred on its tick, however many bars it has
        for i, (impl, gbps) in enumerate(group.items()):
            axes.bar(left + i * width, gbps, width, color=colours[impl], label=None if impl in labelled else impl,
                     edgecolor="black" if impl.startswith("fused_optim") else None, linewidth=0.8)
            labelled.add(impl)
    roof = report["roof"]
    if roof.get("gbps"):
        axes.axhline(roof["gbps"], color="black", linestyle="--", linewidth=1,
                     label=f"memory roof ({roof['kind']}): {roof['gbps']:.1f} GB/s")
    axes.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) > 3 else 0, ha="right"
                    if len(groups) > 3 else "center", fontsize=8)
    axes.set_ylabel("GB/s (bytes model / median time)")
    axes.set_title(f"fused-optim bench: {report['device']}", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    left_out = undrawn_ops(report)
    if left_out:
        axes.set_xlabel("not drawn: " + ", ".join(left_out), fontsize=7)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
