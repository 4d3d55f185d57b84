"""The training loop of `fused-optim train`: one side (fused or torch) at a time, the same seed, data and model.

Host reads happen only at report points (every `log_interval` steps, at evaluations and at the end): there the
loop reads the steps' losses and grad norms and the phase timers, checks the losses for spikes and divergence and
tells the reporter. Between them, a step on a GPU queues work without waiting for it.

Throughput counts only training: the clock stops for evaluations and checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

import fused_optim
from fused_optim.examples.data import VOCAB_SIZE, BatchSampler, Corpus, load_corpus
from fused_optim.examples.gpt import GPT, GPTConfig
from fused_optim.training import checkpoint
from fused_optim.training.config import TrainConfig
from fused_optim.training.monitor import LossMonitor
from fused_optim.training.recipes import SIDES, Recipe, make_recipe
from fused_optim.training.timing import PHASES, PhaseTimer


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
    first_step: int  # 0, or the step it resumed from
    train_loss: list[float] = field(default_factory=list)  # per step, mean over the step's tokens
    grad_norm: list[float | None] = field(default_factory=list)  # per step, before clipping
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    seconds: dict[str, float] = field(default_factory=dict)  # forward, backward, optimizer, wall (this session)
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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: no CUDA GPU is visible")
    return device


def train(config: TrainConfig, reporter: Reporter | None = None, corpus: Corpus | None = None) -> dict:
    """Runs the fused side (and the torch side with `config.compare`) and returns the results by side, with what
    they share: {"config", "device", "corpus", "results": {side: SideResult}}."""
    reporter = reporter if reporter is not None else Reporter()
    device = resolve_device(config.device)
    corpus = corpus if corpus is not None else load_corpus(config.data, config.max_data_bytes)
    saved = checkpoint.load(config.resume, config) if config.resume else {}
    sides = SIDES if config.compare else SIDES[:1]
    states: dict[str, dict] = dict(saved)  # what the checkpoint file holds, updated side by side
    results = {side: _run_side(side, config, device, corpus, saved.get(side), states, reporter) for side in sides}
    return {"config": config, "device": device, "corpus": corpus, "results": results}


def _run_side(side: str, config: TrainConfig, device: torch.device, corpus: Corpus, state: dict | None,
              states: dict[str, dict], reporter: Reporter) -> SideResult:
    torch.manual_seed(config.seed)  # the same initial weights on both sides
    model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, seq_len=config.seq_len, n_layer=config.n_layer,
                          n_head=config.n_head, d_model=config.d_model)).to(device)
    recipe = make_recipe(side, model, config, device)
    sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
    monitor = LossMonitor(config.spike_factor)
    result = SideResult(side=side, num_params=model.num_params(), first_step=0)
    if state is not None:
        model.load_state_dict(state["model"])
        recipe.load_state_dict(state["recipe"])
        sampler.load_state_dict(state["sampler"])
        monitor.load_state_dict(state["monitor"])
        checkpoint.set_rng_states(state["rng"])
        result.first_step = state["step"]
        result.train_loss, result.grad_norm = list(state["history"]["train_loss"]), list(state["history"]["grad_norm"])
        result.val = [tuple(point) for point in state["history"]["val"]]
    last_step = config.stop_after if config.stop_after is not None else config.steps
    reporter.start(side, result.first_step, config.steps, result.num_params)

    def save() -> None:
        if config.save:
            states[side] = {"step": result.steps, "model": model.state_dict(), "recipe": recipe.state_dict(),
                            "sampler": sampler.state_dict(), "monitor": monitor.state_dict(),
                            "rng": checkpoint.rng_states(), "history": result.history()}
            checkpoint.save(config.save, config, states)

    timer = PhaseTimer(device)
    pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per step not yet read: (loss, grad norm)
    wall = 0.0
    clock = time.perf_counter()
    model.train()
    for step in range(result.first_step + 1, last_step + 1):
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        num_tokens = torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(config.micro_batches):
            x, y = (t.to(device, non_blocking=True) for t in sampler.next())
            start = timer.mark()
            loss = recipe.loss_sum(x, y)
            forward_end = timer.mark()
            loss.backward()
            recipe.after_backward()
            timer.record("forward", start, forward_end)
            timer.record("backward", forward_end, timer.mark())
            loss_sum += loss.detach()
            num_tokens += fused_optim.count_tokens(y)
        start = timer.mark()
        grad_norm = recipe.optimizer_step(num_tokens)
        timer.record("optimizer", start, timer.mark())
        pending.append((loss_sum / num_tokens, None if grad_norm is None else grad_norm.detach().clone()))

        evaluate_now = step % config.eval_interval == 0 or step == config.steps
        if step % config.log_interval == 0 or evaluate_now or step == last_step:
            timer.flush()  # the report point's one sync (GPU)
            wall += time.perf_counter() - clock
            result.steps_timed += len(pending)
            _read(pending, result, monitor, reporter, side)
            reporter.progress(side, step, result.train_loss[-1], recipe.lr())
            if monitor.diverged:
                break
            if evaluate_now:
                val_loss = evaluate(recipe, corpus, config, device)
                result.val.append((step, val_loss))
                reporter.evaluated(side, step, val_loss)
                save()
            elif step == last_step:
                save()
            clock = time.perf_counter()
    result.seconds = {phase: timer.totals.get(phase, 0.0) for phase in PHASES} | {"wall": wall}
    result.diverged, result.warnings = monitor.diverged, list(monitor.warnings)
    return result


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
        x, y = (t.to(device) for t in sampler.next())
        total += recipe.loss_sum(x, y).double()
        tokens += y.numel()
    recipe.model.train()
    loss = total.item() / tokens
    return loss if math.isfinite(loss) else math.nan
