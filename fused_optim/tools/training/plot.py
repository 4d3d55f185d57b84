"""`--plot PATH`: the loss curves of a `fused-optim train` run as a PNG: train loss per step and validation loss
at each evaluation, per side (fused vs torch with --compare). `plot_runs` draws the validation curves of several
runs' `--json` reports in one PNG (the optimizer modes side by side, docs/results.md). matplotlib is imported only
here, only when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from fused_optim.tools._pyplot import pyplot

COLOURS = {"fused": "tab:blue", "torch": "tab:orange"}
LABELS = {"fused": "fused_optim", "torch": "torch"}


def plot_losses(summary: dict, path: str) -> None:
    """Writes the loss curves of `summary` (report.summarise) to the PNG `path`."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    for side, run in summary["runs"].items():
        history = run["history"]
        steps = range(1, len(history["train_loss"]) + 1)
        colour = COLOURS[side]
        # the fused line drawn wider: with --compare the two curves coincide, and the torch one lies on top
        axes.plot(steps, history["train_loss"], color=colour, linewidth=2.5 if side == "fused" else 1,
                  linestyle="-" if side == "fused" else "--", label=f"{LABELS[side]} train")
        if history["val"]:
            val_steps, val_losses = zip(*history["val"])
            axes.plot(val_steps, val_losses, color=colour, marker="o", linestyle=":", label=f"{LABELS[side]} val")
    model = summary["model"]
    axes.set_title(f"GPT {model['n_layer']}L {model['d_model']}d ({model['params'] / 1e6:.2f} M params), "
                   f"{summary['device']['name']}", fontsize=10)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats per byte)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def run_label(config: dict) -> str:
    """What sets a run's optimizer apart, from its report's config: the optimizer (when Lion), the params' dtype,
    master weights, moments."""
    params = config.get("params", "fp32")
    masters = {False: ", no masters" if params == "bf16" else "", True: ", exact masters",
               24: ", 24-bit masters"}[config.get("master_weights", False)]
    optimizer = "Lion, " if config.get("optimizer") == "lion" else ""
    return f"{optimizer}{params} params{masters}, {config['moments']} moments"


def plot_runs(report_paths: list[str], path: str) -> None:
    """Writes the validation loss of each `--json` report in `report_paths` (its fused side), one curve per run
    labelled by its optimizer settings, to the PNG `path`."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    for report_path in report_paths:
        report = json.loads(Path(report_path).read_text())
        val_steps, val_losses = zip(*report["runs"]["fused"]["history"]["val"])
        axes.plot(val_steps, val_losses, marker=".", label=f"{run_label(report['config'])}: {val_losses[-1]:.4f}")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("validation loss (nats per byte)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
