"""Checkpoints of `fused-optim train`: everything a run needs to continue bit-exactly.

Per side ("fused", and "torch" with --compare): the step, the model, the optimizer and the schedule, the data
sampler's generator, the loss monitor and the history so far; and once, torch's global RNG states (CPU, and CUDA
where present: nothing here draws from them after initialisation, but a model with dropout would). The gradient
accumulator holds nothing between steps (its main grads are zeroed after each), so it has no state to keep.

The file is written to a temporary name and renamed over PATH, so an interruption mid-write leaves the previous
checkpoint whole. It holds only tensors and plain Python values: `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from fused_optim.tools.training.config import RUN_DEFINING, TrainConfig

FORMAT = "fused_optim.train.checkpoint/1"


def rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: str | os.PathLike, config: TrainConfig, corpus_digest: str, sides: dict[str, dict]) -> None:
    """Writes the run's config, its corpus's digest (Corpus.digest), torch's RNG states and each side's state
    (`sides`: side name -> state) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, "config": config.as_dict(), "corpus_digest": corpus_digest, "rng": rng_states(),
                "sides": sides}, partial)
    os.replace(partial, path)


def load(path: str | os.PathLike, config: TrainConfig, corpus_digest: str) -> dict:
    """The checkpoint at `path` ({"config", "rng", "sides": {side: state}}), after checking that `config` defines
    the same run, on the same text: a --data path whose files changed, or the default corpus of another Python,
    would go on silently with other batches. A side the checkpoint lacks (the run had no --compare) starts from
    step 0."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume {path}: no such checkpoint") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):  # not a torch.save file, or cut short
        raise ValueError(f"--resume {path}: not a fused-optim train checkpoint (torch.load cannot read it)") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"--resume {path}: not a fused-optim train checkpoint")
    # a setting the checkpoint lacks came after it was written, and its run had that setting's default
    saved = {field.name: field.default for field in dataclasses.fields(TrainConfig)} | checkpoint["config"]
    differing = [f"{name} (checkpoint {saved.get(name)!r}, now {getattr(config, name)!r})" for name in RUN_DEFINING
                 if _normalised(saved.get(name)) != _normalised(getattr(config, name))]
    if differing:
        raise ValueError(f"--resume {path}: the checkpoint is of a different run: {'; '.join(differing)}")
    if checkpoint.get("corpus_digest", corpus_digest) != corpus_digest:  # checkpoints before the digest: unchecked
        raise ValueError(f"--resume {path}: the training text differs from the checkpoint's run's (its bytes "
                         "changed, or the default corpus is another Python's standard library)")
    return checkpoint


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value
