"""What `fused-optim train` reports: one summary per side (losses, perplexity, throughput, the step-time split,
N, D, 6·N·D, MFU, Chinchilla's 20·N), the fused-vs-torch loss agreement with --compare, as a dict for --json
and as a rich table.

JSON schema ("schema": "fused_optim.train/1"): {schema, config, versions, device: {type, name, peak_bf16_flops},
backend (the fused side's kernels: cuda, triton, cpu or torch), precision ("bf16 autocast" or "fp32"),
corpus: {name, files, train_tokens, val_tokens},
model: {params, flop_params (the N of 6·N·D: the params less the position embedding), n_layer, n_head, d_model,
seq_len, vocab_size},
tokens_per_step, chinchilla_tokens, runs: {side: {steps, resumed_from, tokens, flops, train_loss, val_loss,
val_perplexity, train_perplexity, tokens_per_second, step_ms: {forward, backward, optimizer, total}, mfu,
diverged, warnings, history: {train_loss: [...], grad_norm: [...], val: [[step, loss], ...]}}},
compare: null | {steps_compared, max_abs_loss_diff_first_10, max_abs_loss_diff, max_rel_loss_diff}}.
A non-finite number (NaN, inf: a diverged run) is written as null.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

import fused_optim
from fused_optim import _backend
from fused_optim.tools.examples.data import VOCAB_SIZE
from fused_optim.tools.training import metrics
from fused_optim.tools.training.config import COMPARE_OPTIMIZERS
from fused_optim.tools.training.loop import SideResult
from fused_optim.tools.training.timing import PHASES

SCHEMA = "fused_optim.train/1"
SMOOTHING_STEPS = 10  # the reported train loss is the mean of the last this many steps (one step is noisy)


def summarise(run: dict) -> dict:
    """The JSON-ready summary of `loop.train`'s result."""
    config, device, corpus = run["config"], run["device"], run["corpus"]
    results: dict[str, SideResult] = run["results"]
    num_params, flop_params = next(iter(results.values())).num_params, next(iter(results.values())).flop_params
    peak = metrics.peak_flops(device)
    return {
        "schema": SCHEMA,
        "config": config.as_dict(),
        "versions": {"fused_optim": fused_optim.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "device": {"type": device.type, "name": _device_name(device), "peak_bf16_flops": peak},
        "backend": config.backend,  # the fused side's kernels, as resolved by loop.train
        "precision": ("bf16 autocast" if config.autocast_dtype(device.type) is not None else "fp32")
                     + (" · bf16 params" if config.params == "bf16" else ""),
        "corpus": {"name": corpus.name, "files": corpus.num_files, "train_tokens": corpus.train.numel(),
                   "val_tokens": corpus.val.numel()},
        "model": {"params": num_params, "flop_params": flop_params, "n_layer": config.n_layer, "n_head": config.n_head,
                  "d_model": config.d_model, "seq_len": config.seq_len, "vocab_size": VOCAB_SIZE},
        "tokens_per_step": config.tokens_per_step,
        "chinchilla_tokens": metrics.chinchilla_tokens(num_params),
        "runs": {side: _side_summary(result, config.tokens_per_step, peak) for side, result in results.items()},
        "compare": _agreement(results["fused"], results["torch"]) if "torch" in results else None,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{_backend.cpu_name()} ({threads} thread{'s' if threads != 1 else ''})"


def _side_summary(result: SideResult, tokens_per_step: int, peak: float | None) -> dict:
    tokens = result.steps * tokens_per_step
    timed = max(result.steps_timed, 1)
    wall = result.seconds.get("wall", 0.0)
    tokens_per_second = result.steps_timed * tokens_per_step / wall if wall > 0 else None
    last = result.train_loss[-SMOOTHING_STEPS:]
    train_loss = sum(last) / len(last) if last else None
    val_loss = result.val[-1][1] if result.val else None
    return {
        "steps": result.steps,
        "resumed_from": result.first_step,
        "tokens": tokens,
        "flops": metrics.training_flops(result.flop_params, tokens),
        "train_loss": train_loss,
        "train_perplexity": None if train_loss is None else metrics.perplexity(train_loss),
        "val_loss": val_loss,
        "val_perplexity": None if val_loss is None else metrics.perplexity(val_loss),
        "tokens_per_second": tokens_per_second,
        "step_ms": {phase: 1e3 * result.seconds.get(phase, 0.0) / timed for phase in PHASES}
        | {"total": 1e3 * wall / timed},
        "mfu": None if tokens_per_second is None else metrics.mfu(result.flop_params, tokens_per_second, peak),
        "diverged": result.diverged,
        "warnings": list(result.warnings),
        "history": {"train_loss": list(result.train_loss), "grad_norm": list(result.grad_norm),
                    "val": [list(point) for point in result.val]},
    }


def _agreement(fused: SideResult, reference: SideResult) -> dict:
    """How far the fused side's per-step losses are from torch's, over the steps both ran."""
    pairs = list(zip(fused.train_loss, reference.train_loss))
    diffs = [abs(a - b) for a, b in pairs]
    return {
        "steps_compared": len(pairs),
        "max_abs_loss_diff_first_10": max(diffs[:10], default=None),
        "max_abs_loss_diff": max(diffs, default=None),
        "max_rel_loss_diff": max((d / abs(b) for d, (_, b) in zip(diffs, pairs) if b), default=None),
    }


def write_json(summary: dict, path: str) -> None:
    """Writes `summary` as strict JSON: a non-finite number (a diverged run's loss, an overflowed perplexity) is
    written as null, which every JSON reader accepts (NaN and Infinity are not JSON); `diverged` says why."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite_or_null(summary), indent=2, allow_nan=False) + "\n")


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


# ---- the table ----------------------------------------------------------------------------------------------------

def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(summary: dict):
    """A rich Table of the summary: one column per side. Names from outside (the data's path, the device's) are
    escaped: rich reads brackets in a title or caption as markup."""
    from rich.markup import escape
    from rich.table import Table

    runs = summary["runs"]
    sides = list(runs)
    baseline = COMPARE_OPTIMIZERS[summary["config"].get("compare_optimizer", "adamw")][2]
    labels = {"fused": "fused_optim", "torch": f"{baseline} (baseline)"}
    model = summary["model"]
    title = (f"fused-optim train · GPT {model['n_layer']}L {model['n_head']}H {model['d_model']}d · "
             f"{escape(summary['device']['name'])} · {summary['precision']} · {summary['backend']} kernels")
    grid = Table(title=title, title_justify="left", caption_justify="left")
    grid.add_column("metric")
    for side in sides:
        grid.add_column(labels[side], justify="right")

    def row(label: str, render) -> None:
        grid.add_row(label, *(render(runs[side]) for side in sides))

    row("steps", lambda r: f"{r['steps']}" + (f" (resumed at {r['resumed_from']})" if r["resumed_from"] else ""))
    row(f"train loss (last {SMOOTHING_STEPS} steps)", lambda r: _num(r["train_loss"]))
    row("train perplexity", lambda r: _num(r["train_perplexity"], 2))
    row("val loss", lambda r: _num(r["val_loss"]))
    row("val perplexity", lambda r: _num(r["val_perplexity"], 2))
    row("tokens/s", lambda r: _si(r["tokens_per_second"]))
    row("step time", lambda r: f"{r['step_ms']['total']:.1f} ms")
    for phase in PHASES:
        row(f"  {phase}", lambda r, phase=phase: f"{r['step_ms'][phase]:.1f} ms")
    grid.add_section()
    row("params N", lambda r: _si(model["params"]))
    row("tokens D", lambda r: _si(r["tokens"]))
    row("Chinchilla-optimal D ≈ 20·N", lambda r: _si(summary["chinchilla_tokens"]))
    row("compute ≈ 6·N·D", lambda r: _si(r["flops"], "FLOP"))
    peak = summary["device"]["peak_bf16_flops"]
    row("MFU (6·N·D)" + (f" of {_si(peak, 'FLOP/s')} bf16" if peak else ""),
        lambda r: "unknown" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %")
    row("warnings", lambda r: "diverged" if r["diverged"] else str(len(r["warnings"])))
    caption = [f"data: {escape(summary['corpus']['name'])}, {_si(summary['corpus']['train_tokens'])} train / "
               f"{_si(summary['corpus']['val_tokens'])} val tokens",
               f"6·N·D and MFU: N = {_si(model['flop_params'])}, the params less the position embedding (a lookup); "
               "attention's own FLOPs left out"]
    agreement = summary["compare"]
    if agreement is not None and agreement["max_abs_loss_diff"] is not None:
        caption.append(f"fused vs torch, per-step train loss: max |Δ| {agreement['max_abs_loss_diff']:.2e} over "
                       f"{agreement['steps_compared']} steps ({agreement['max_abs_loss_diff_first_10']:.2e} over "
                       "the first 10)")
    grid.caption = "\n".join(caption)
    return grid
