"""The training loop of `fused-optim train`: the fused side, and with --compare the torch side, from the same
seed, data and initial weights.

Host reads happen only at report points (every `log_interval` steps, at evaluations and at the end): there the
loop reads the steps' losses and grad norms and the phase timers, checks the losses for spikes and divergence and
tells the reporter. Between them, a step on a GPU queues work without waiting for it.

With --compare the two sides take turns step by step, so a busy machine slows both alike. Each side's time is
the sum of its own steps' times (timer marks around each step: CUDA events on a GPU, where a step's events bracket
only its own work in the stream), so evaluations, checkpoints and the other side's steps are not counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

import fused_optim
from fused_optim import _backend
from fused_optim.tools.examples.data import VOCAB_SIZE, BatchSampler, Corpus, load_corpus, split_windows
from fused_optim.tools.examples.gpt import GPT, GPTConfig
from fused_optim.tools.training import checkpoint
from fused_optim.tools.training.config import TrainConfig
from fused_optim.tools.training.monitor import LossMonitor
from fused_optim.tools.training.recipes import SIDES, Recipe, make_recipe
from fused_optim.tools.training.timing import PHASES, PhaseTimer


class Reporter:
    """What the loop tells its caller (the CLI draws a progress bar from it); every method does nothing here."""

    def start(self, side: str, first_step: int, steps: int, num_params: int) -> None: ...

    def progress(self, side: str, step: int, loss: float, lr: float) -> None: ...

    def evaluated(self, side: str, step: int, val_loss: float) -> None: ...

    def warn(self, side: str, message: str) -> None: ...


@dataclass
class SideResult:
    """One side's run: its history from step 1 (including steps before a resume) and this session's times."""

    side: str
    num_params: int
    flop_params: int  # the N of 6·N·D (GPT.num_flop_params)
    first_step: int  # 0, or the step it resumed from
    train_loss: list[float] = field(default_factory=list)  # per step, mean over the step's tokens
    grad_norm: list[float | None] = field(default_factory=list)  # per step, before clipping
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    # this session's seconds: forward, backward, optimizer, and wall (whole steps, batch drawing included)
    seconds: dict[str, float] = field(default_factory=dict)
    steps_timed: int = 0  # steps run in this session
    warnings: list[str] = field(default_factory=list)
    diverged: bool = False

    @property
    def steps(self) -> int:
        return len(self.train_loss)

    def history(self) -> dict:
        return {"train_loss": list(self.train_loss), "grad_norm": list(self.grad_norm), "val": list(self.val)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the training runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible")
    return device


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The kernels the fused side runs on `device` ("cuda", "triton", "cpu" or "torch"): `backend`, or when None
    $FUSED_OPTIM_BACKEND or auto, resolved. A resume must run the same ones to be bit-exact."""
    try:
        return _backend.resolve(backend if backend is not None else _backend.default_backend(), device.type)
    except RuntimeError as error:  # this machine cannot run the backend asked for: a bad setting, not a failure
        raise ValueError(str(error)) from None


def check_corpus_fits(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold a window of seq_len + 1 tokens; checked before the first step, since the validation
    split is otherwise first read at the first evaluation."""
    for split, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if tokens.numel() <= seq_len:
            raise ValueError(f"the {split} split of {corpus.name} has {tokens.numel()} tokens, too few for windows "
                             f"of --seq-len {seq_len} + 1: pass more text with --data (the last 10 % of it is the "
                             "validation split) or a smaller --seq-len")


def batch_on(device: torch.device, windows: Tensor) -> tuple[Tensor, Tensor]:
    """(input, target) on `device` from the sampler's CPU windows. To a GPU: one copy from pinned memory, which
    is asynchronous (a non_blocking copy from pageable memory is staged by the host and may wait)."""
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    return split_windows(windows)


def train(config: TrainConfig, reporter: Reporter | None = None, corpus: Corpus | None = None) -> dict:
    """Runs the fused side (and the torch side with `config.compare`, step by step in turn with it, so that both
    meet the same machine load) and returns the results by side with what they share:
    {"config", "device", "corpus", "results": {side: SideResult}}."""
    reporter = reporter if reporter is not None else Reporter()
    device = resolve_device(config.device)
    # --device cuda:N: make N the current device, on which the timer's CUDA events and the loop's streams live
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _train(config, reporter, corpus, device)


def _train(config: TrainConfig, reporter: Reporter, corpus: Corpus | None, device: torch.device) -> dict:
    config = config.replace(backend=resolve_backend(config.backend, device))  # checkpoints and reports name it
    corpus = corpus if corpus is not None else load_corpus(config.data, config.max_data_bytes)
    check_corpus_fits(corpus, config.seq_len)
    corpus_digest = corpus.digest()
    saved = checkpoint.load(config.resume, config, corpus_digest) if config.resume else {"sides": {}}
    sides = SIDES if config.compare else SIDES[:1]
    runs = [SideRun(side, config, device, corpus, saved["sides"].get(side), reporter) for side in sides]
    if "rng" in saved:
        checkpoint.set_rng_states(saved["rng"])  # after the models' initialisation drew from them
    last_step = config.stop_after if config.stop_after is not None else config.steps
    resumed_at = min(run.steps_taken for run in runs)
    if resumed_at >= last_step:
        raise ValueError(f"--resume {config.resume}: the checkpoint is at step {resumed_at}, nothing is left to train "
                         f"up to step {last_step} (--stop-after, or --steps)")
    for step in range(resumed_at + 1, last_step + 1):
        save_now = False
        for run in runs:
            if not run.stopped and run.steps_taken == step - 1:  # a side resumed further on waits for the other
                save_now |= run.step(step, last_step)
        if save_now and config.save:
            checkpoint.save(config.save, config, corpus_digest, {run.side: run.state_dict() for run in runs})
        if all(run.stopped for run in runs):
            break
    return {"config": config, "device": device, "corpus": corpus,
            "results": {run.side: run.finish() for run in runs}}


class SideRun:
    """One side's model, recipe, data sampler, loss monitor and timers, stepped by `train`."""

    def __init__(self, side: str, config: TrainConfig, device: torch.device, corpus: Corpus, state: dict | None,
                 reporter: Reporter) -> None:
        self.side, self.config, self.device, self.corpus, self.reporter = side, config, device, corpus, reporter
        torch.manual_seed(config.seed)  # the same initial weights on both sides
        # --params bf16: the fused side's model in bf16 (the torch side keeps fp32)
        dtype = torch.bfloat16 if side == "fused" and config.params == "bf16" else torch.float32
        self.model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, seq_len=config.seq_len, n_layer=config.n_layer,
                                   n_head=config.n_head, d_model=config.d_model)).to(device=device, dtype=dtype)
        self.recipe = make_recipe(side, self.model, config, device)
        self.sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
        self.monitor = LossMonitor(config.spike_factor)
        self.result = SideResult(side=side, num_params=self.model.num_params(),
                                 flop_params=self.model.num_flop_params(), first_step=0)
        if state is not None:
            self.load_state_dict(state)
        self.timer = PhaseTimer(device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # steps not yet read: (loss, grad norm)
        self.steps_taken = self.result.first_step  # ahead of result.steps, which grows at report points
        self.stopped = self.monitor.diverged  # a side that diverged before the checkpoint stays stopped
        self.model.train()
        reporter.start(side, self.result.first_step, config.steps, self.result.num_params)

    def step(self, step: int, last_step: int) -> bool:
        """Runs optimizer step `step` (1 = the first); at a report point reads its results, and at an evaluation
        evaluates. Returns whether a checkpoint is due (an evaluation, or the last step of this session)."""
        config, device, timer, recipe = self.config, self.device, self.timer, self.recipe
        step_start = timer.mark()
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        for micro_batch in range(config.micro_batches):
            x, y = batch_on(device, self.sampler.next_windows())
            num_tokens += fused_optim.count_tokens(y)
            start = timer.mark()
            loss = recipe.loss_sum(x, y)
            forward_end = timer.mark()
            if micro_batch == config.micro_batches - 1:
                recipe.before_last_backward(num_tokens)
            loss.backward()
            recipe.after_backward()
            timer.record("forward", start, forward_end)
            timer.record("backward", forward_end, timer.mark())
            loss_sum += loss.detach()
        start = timer.mark()
        grad_norm = recipe.optimizer_step(num_tokens)
        end = timer.mark()
        timer.record("optimizer", start, end)
        timer.record("step", step_start, end)  # the phases plus drawing the batches
        self.pending.append((loss_sum / num_tokens, None if grad_norm is None else grad_norm.detach().clone()))
        self.steps_taken = step

        evaluate_now = step % config.eval_interval == 0 or step == config.steps
        if not (step % config.log_interval == 0 or evaluate_now or step == last_step):
            return False
        timer.flush()  # the report point's one sync (GPU)
        self.result.steps_timed += len(self.pending)
        _read(self.pending, self.result, self.monitor, self.reporter, self.side)
        self.reporter.progress(self.side, step, self.result.train_loss[-1], recipe.lr())
        if self.monitor.diverged:
            self.stopped = True
            return False
        if evaluate_now:
            val_loss = evaluate(recipe, self.corpus, config, device)
            self.result.val.append((step, val_loss))
            self.reporter.evaluated(self.side, step, val_loss)
        return evaluate_now or step == last_step

    def finish(self) -> SideResult:
        result = self.result
        totals = self.timer.flush()
        result.seconds = {phase: totals.get(phase, 0.0) for phase in PHASES} | {"wall": totals.get("step", 0.0)}
        result.diverged, result.warnings = self.monitor.diverged, list(self.monitor.warnings)
        return result

    def state_dict(self) -> dict:
        return {"step": self.result.steps, "model": self.model.state_dict(), "recipe": self.recipe.state_dict(),
                "sampler": self.sampler.state_dict(), "monitor": self.monitor.state_dict(),
                "history": self.result.history()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.recipe.load_state_dict(state["recipe"])
        self.sampler.load_state_dict(state["sampler"])
        self.monitor.load_state_dict(state["monitor"])
        history = state["history"]
        self.result.first_step = state["step"]
        self.result.train_loss, self.result.grad_norm = list(history["train_loss"]), list(history["grad_norm"])
        self.result.val = [tuple(point) for point in history["val"]]


def _read(pending: list, result: SideResult, monitor: LossMonitor, reporter: Reporter, side: str) -> None:
    """Reads the pending steps' losses and grad norms on the host (one transfer) and checks them."""
    losses = torch.stack([loss for loss, _ in pending]).tolist()
    has_norms = pending[0][1] is not None
    norms = torch.stack([norm for _, norm in pending]).tolist() if has_norms else [None] * len(pending)
    for loss, norm in zip(losses, norms):
        result.train_loss.append(loss)
        result.grad_norm.append(norm)
        message = monitor.check(result.steps, loss)
        if message is not None:
            reporter.warn(side, message)
    pending.clear()


@torch.no_grad()
def evaluate(recipe: Recipe, corpus: Corpus, config: TrainConfig, device: torch.device) -> float:
    """Mean loss per token over `eval_batches` validation micro-batches: the same windows at every evaluation (a
    fresh generator), drawn apart from the training sampler, so evaluating changes nothing of the training."""
    sampler = BatchSampler(corpus.val, config.batch_size, config.seq_len, seed=config.seed + 1)
    recipe.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for _ in range(config.eval_batches):
        x, y = batch_on(device, sampler.next_windows())
        total += recipe.loss_sum(x, y).double()
        tokens += y.numel()
    recipe.model.train()
    loss = total.item() / tokens
    return loss if math.isfinite(loss) else math.nan
