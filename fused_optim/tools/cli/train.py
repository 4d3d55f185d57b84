"""`fused-optim train`: trains the example GPT with the whole package and reports the run (fused_optim/tools/training).

    fused-optim train --quick                 seconds on a CPU: a tiny model, 30 steps
    fused-optim train --compare --plot loss.png --json run.json
    fused-optim train --steps 1000 --save ckpt.pt   then   --resume ckpt.pt   to continue bit-exactly
"""

from __future__ import annotations

import argparse
import sys

from fused_optim.tools._pyplot import png_name
from fused_optim.tools.cli.outputs import output_problem
from fused_optim.tools.training.config import COMPARE_OPTIMIZERS, OPTIMIZER_DEFAULTS, QUICK, TrainConfig

DEFAULTS = TrainConfig()
CONFIG_FIELDS = set(DEFAULTS.as_dict())
MASTER_WEIGHTS = {"off": False, "exact": True, "24": 24}  # --master-weights -> fused_optim.AdamW's master_weights


def add_parser(commands) -> argparse.ArgumentParser:
    """Adds the `train` subcommand to the `fused-optim` parser's subparsers."""
    d = DEFAULTS
    train = commands.add_parser(
        "train",
        help="train a small GPT with fused_optim (optionally beside torch's optimizer and loss)",
        description="Trains a small GPT (fused_optim/tools/examples/gpt.py) on byte-level text with the whole package: "
        "fused AdamW (or Lion) with decoupled weight decay and in-step grad-norm clipping, warmup + cosine lr, "
        "gradient accumulation over micro-batches normalised by the token count, fused linear cross-entropy over the "
        "LM head, bf16 autocast of the transformer body on a GPU (head and loss in fp32). Reports train/val loss and "
        "perplexity, tokens/s, the step time split into forward/backward/optimizer, params N, tokens D, compute "
        "~6*N*D, MFU on a GPU, and the Chinchilla-optimal token budget (~20*N) beside D; warns on loss spikes and "
        "stops on divergence.",
        argument_default=argparse.SUPPRESS,  # only the flags given appear in args: --quick fills in the rest
        epilog="Default data: the running Python's standard-library source (*.py, sorted, first 8 MiB), one token "
        "per byte; the last 10% is the validation set. Timings on a GPU come from CUDA events read every "
        "--log-interval steps, the loop's only host syncs.",
    )
    run = train.add_argument_group("run")
    run.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    run.add_argument("--batch-size", type=int,
                     help=f"sequences per micro-batch (default {d.batch_size})")
    run.add_argument("--micro-batches", type=int,
                     help="micro-batches accumulated into each optimizer step; the step's loss is the mean over "
                     f"all their tokens (default {d.micro_batches})")
    run.add_argument("--seq-len", type=int, help=f"tokens (bytes) per sequence (default {d.seq_len})")
    run.add_argument("--device",
                     help="auto (default: the GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int,
                     help=f"seeds the weights and the batches; both sides use the same (default {d.seed})")
    run.add_argument("--data", metavar="PATH",
                     help="a text file or a directory (its text files, read in sorted order, binary ones skipped; "
                     "first 8 MiB) instead of the Python standard library's source")
    run.add_argument("--quick", action="store_true",
                     help="a tiny run for a smoke test: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                                        for k, v in QUICK.items())
                     + " (flags given explicitly win)")
    optim = train.add_argument_group("optimizer")
    optim.add_argument("--optimizer", choices=tuple(OPTIMIZER_DEFAULTS),
                       help="the fused side's optimizer: fused_optim.AdamW or fused_optim.Lion "
                       f"(default {d.optimizer}; --compare needs adamw)")
    optim.add_argument("--lr", type=float, help="peak learning rate (default "
                       + ", ".join(f"{values['lr']} for {name}" for name, values in OPTIMIZER_DEFAULTS.items()) + ")")
    optim.add_argument("--warmup", type=int,
                       help=f"linear warmup steps, then cosine decay to {d.min_lr_ratio} x lr at --steps "
                       f"(default {d.warmup}, or --steps where fewer)")
    optim.add_argument("--weight-decay", type=float,
                       help="decoupled weight decay, on matrices and embeddings, not on biases and LayerNorm "
                       "(default " + ", ".join(f"{values['weight_decay']} for {name}"
                                               for name, values in OPTIMIZER_DEFAULTS.items()) + ")")
    optim.add_argument("--max-grad-norm", type=float,
                       help="clip the global gradient norm to this; 0 turns clipping off "
                       f"(default {d.max_grad_norm})")
    optim.add_argument("--moments", choices=("fp32", "bf16", "int8"),
                       help="the fused optimizer's moment storage: bf16 halves it, int8 quarters it, both rounded "
                       f"stochastically (default {d.moments}; --compare's torch AdamW keeps fp32)")
    optim.add_argument("--params", choices=("fp32", "bf16"),
                       help=f"the fused side's param dtype: bf16 stores the model in bf16 (default {d.params}; "
                       "--compare's torch side keeps fp32)")
    optim.add_argument("--master-weights", choices=tuple(MASTER_WEIGHTS),
                       help="the fused optimizer's master weights of bf16 params: exact (fp32, kept as a 16-bit "
                       "remainder beside the param) or 24 (24-bit, an 8-bit remainder); default off: the update "
                       "rounds to the bf16 param")
    optim.add_argument("--gradient-release", action="store_true",
                       help="the fused optimizer steps each param inside the last micro-batch's backward as soon as "
                       "its grad is in, and frees it (the full set of grads is never alive; the same result as "
                       "stepping after it); needs --max-grad-norm 0")
    model = train.add_argument_group("model")
    model.add_argument("--n-layer", type=int, help=f"transformer blocks (default {d.n_layer})")
    model.add_argument("--n-head", type=int, help=f"attention heads (default {d.n_head})")
    model.add_argument("--d-model", type=int,
                       help=f"width of the residual stream, a multiple of --n-head (default {d.d_model})")
    report = train.add_argument_group("reporting and checkpoints")
    report.add_argument("--compare", action="store_true",
                        help="also train, with the same seed and data, torch.optim.AdamW + "
                        "torch.nn.utils.clip_grad_norm_ + F.cross_entropy over materialised logits, and report "
                        "both side by side with their per-step loss difference")
    report.add_argument("--compare-optimizer", choices=tuple(COMPARE_OPTIMIZERS),
                        help="the --compare side's optimizer: torch's AdamW (default), torchao's AdamW8bit or "
                        "bitsandbytes' AdamW8bit (each where installed), with the same lr, betas and decay")
    report.add_argument("--eval-interval", type=int,
                        help="validation loss every this many steps and at the end; checkpoints are written then "
                        f"too (default {d.eval_interval})")
    report.add_argument("--eval-batches", type=int,
                        help=f"validation micro-batches per evaluation, the same each time (default {d.eval_batches})")
    report.add_argument("--log-interval", type=int,
                        help=f"read losses and timers every this many steps (default {d.log_interval})")
    report.add_argument("--save", metavar="PATH",
                        help="checkpoint (model, optimizer, schedule, data sampler and RNG states, step, history) "
                        "written at every evaluation and at the end")
    report.add_argument("--resume", metavar="PATH",
                        help="continue from a --save checkpoint, bit-exactly; the run-defining flags (sizes, "
                        "optimizer, --steps, --seed, --data, --eval-batches), the kernels ($FUSED_OPTIM_BACKEND) and "
                        "the training text itself (checked by its SHA-256) must be the checkpoint's")
    report.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop after this step (saving with --save), to --resume later")
    report.add_argument("--plot", metavar="PATH", help="write the loss curves as a PNG (needs matplotlib)")
    report.add_argument("--json", metavar="PATH", help="write the metrics and per-step history as JSON")
    return train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags given (`args` holds no others); with --quick, QUICK's values for the rest."""
    given = {key: value for key, value in vars(args).items() if key in CONFIG_FIELDS}
    if given.get("max_grad_norm") == 0:
        given["max_grad_norm"] = None
    if "master_weights" in given:
        given["master_weights"] = MASTER_WEIGHTS[given["master_weights"]]
    values = (dict(QUICK) if getattr(args, "quick", False) else {}) | given
    if values.get("master_weights") and values.get("params", TrainConfig.params) != "bf16":
        raise ValueError(f"--master-weights {args.master_weights} keeps the masters of bf16 params: it needs "
                         "--params bf16")
    if "steps" in given and "warmup" not in given:  # a run shorter than the default warmup warms up throughout
        values["warmup"] = min(values.get("warmup", TrainConfig.warmup), given["steps"])
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"fused-optim train: {error}", file=sys.stderr)
        return 2
    plot, json_path = getattr(args, "plot", None), getattr(args, "json", None)
    plot = png_name(plot) if plot else None  # the name written, said and checked
    problem = output_problem({"--save": config.save, "--json": json_path, "--plot": plot})
    if problem:
        print(f"fused-optim train: {problem}", file=sys.stderr)
        return 2

    from rich.console import Console

    from fused_optim.tools.training import report, train
    from fused_optim.tools.training.plot import plot_losses

    console = Console()
    reporter = RichReporter(Console(stderr=True))
    try:
        with reporter.progress_bar:
            result = train(config, reporter)
    except (ValueError, FileNotFoundError) as error:  # bad flags or data, a checkpoint of another run; not bugs
        print(f"fused-optim train: {error}", file=sys.stderr)
        return 2
    summary = report.summarise(result)
    if json_path:  # first: whatever the table meets, the run's record is kept
        report.write_json(summary, json_path)
    console.print(report.table(summary))  # the warnings were printed as they came (RichReporter.warn)
    if json_path:
        console.print(f"wrote {json_path}", markup=False)
    if plot:
        plot_losses(summary, plot)
        console.print(f"wrote {plot}", markup=False)
    if config.save:
        console.print(f"checkpoint: {config.save}", markup=False)
    return 1 if any(r["diverged"] for r in summary["runs"].values()) else 0


class RichReporter:
    """A progress bar per side, updated at the loop's report points; warnings printed above it."""

    def __init__(self, console) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console
        self.progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console)
        self.tasks: dict[str, int] = {}
        self.train: dict[str, str] = {}  # the last loss and lr read, per side
        self.val: dict[str, str] = {}  # the last validation loss, per side

    def start(self, side: str, first_step: int, steps: int, num_params: int) -> None:
        self.tasks[side] = self.progress_bar.add_task(f"{side} ({num_params / 1e6:.2f} M params)", total=steps,
                                                      completed=first_step, status="")

    def progress(self, side: str, step: int, loss: float, lr: float) -> None:
        self.train[side] = f"loss {loss:.3f}  lr {lr:.2e}"
        self._show(side, completed=step)

    def evaluated(self, side: str, step: int, val_loss: float) -> None:
        self.val[side] = f"  val {val_loss:.3f}"
        self._show(side)

    def _show(self, side: str, **update) -> None:
        status = self.train.get(side, "") + self.val.get(side, "")
        self.progress_bar.update(self.tasks[side], status=status, **update)

    def warn(self, side: str, message: str) -> None:
        self.progress_bar.console.print(f"[yellow]warning ({side}):[/] {message}")
