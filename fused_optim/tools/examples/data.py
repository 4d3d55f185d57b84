"""Byte-level text corpora for the example GPT, and seeded random batches from them.

The default corpus needs no download: the Python standard library's own source, read from the running
interpreter (`sysconfig.get_paths()["stdlib"]`), its `*.py` files in sorted path order (site-packages and
caches left out) until `max_bytes`. Each byte is a token (vocab 256), so any text works and nothing is learned
about tokenisation. `--data PATH` reads a text file, or every file of a directory in sorted path order.

The split is deterministic: the last `val_fraction` of the bytes is the validation set. Batches are random windows
drawn with the sampler's own torch.Generator, so its state (saved in checkpoints) fixes every later batch.

Example:
    >>> from fused_optim.tools.examples.data import Corpus, BatchSampler
    >>> corpus = Corpus.from_bytes(b"hello world, " * 100, name="demo")
    >>> sampler = BatchSampler(corpus.train, batch_size=4, seq_len=8, seed=0)
    >>> x, y = sampler.next()
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 8]), True)
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 8 << 20  # enough for thousands of steps of the default model; read in about a second
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """A corpus as uint8 tokens, split into train and validation parts."""

    name: str  # what it is, for reports
    train: Tensor  # (N_train,) uint8
    val: Tensor  # (N_val,) uint8
    num_files: int

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()

    def digest(self) -> str:
        """SHA-256 of the tokens, train then validation: what a checkpoint's resume must find again."""
        return hashlib.sha256(self.train.numpy().tobytes() + self.val.numpy().tobytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, name: str, num_files: int = 1, val_fraction: float = 0.1) -> Corpus:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not data:
            raise ValueError(f"{name}: no text to train on (empty)")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        num_val = int(len(tokens) * val_fraction)
        return cls(name=name, train=tokens[: len(tokens) - num_val], val=tokens[len(tokens) - num_val:],
                   num_files=num_files)

    @classmethod
    def from_files(cls, files: list[Path], name: str, max_bytes: int | None = None,
                   val_fraction: float = 0.1) -> Corpus:
        """The files' bytes concatenated in the given order, cut at `max_bytes` (None: all). A binary file (an
        image, an archive: by git's rule, a zero byte in its first 8000) is left out."""
        chunks, total, used = [], 0, 0
        for path in files:
            if max_bytes is not None and total >= max_bytes:
                break
            try:
                with open(path, "rb") as file:  # only the bytes kept: a corpus of gigabytes is not read whole
                    data = file.read(-1 if max_bytes is None else max_bytes - total)
            except OSError as error:
                raise ValueError(f"{name or 'the corpus'}: cannot read {path}: {error.strerror}") from None
            if b"\0" in data[:8000]:
                continue
            chunks.append(data)
            total += len(data)
            used += 1
        return cls.from_bytes(b"".join(chunks), name=name, num_files=used, val_fraction=val_fraction)


def text_files(root: Path, suffix: str | None = None) -> list[Path]:
    """Files under `root` (with `suffix`, when given) in sorted path order, skipping _SKIPPED_DIRS and dot-dirs."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        # regular files (or links to them) only: a socket, a named pipe or a dangling link is no text to read
        paths = (Path(directory, n) for n in sorted(names) if suffix is None or n.endswith(suffix))
        found.extend(path for path in paths if path.is_file())
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """The running interpreter's standard-library source (`*.py`), up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = text_files(root, suffix=".py")
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library path {root}; pass --data PATH")
    version = ".".join(map(str, sys.version_info[:3]))
    corpus = Corpus.from_files(files, name="", max_bytes=max_bytes)
    corpus.name = f"Python {version} stdlib source ({corpus.num_files} files)"
    return corpus


def load_corpus(path: str | os.PathLike | None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Corpus:
    """`path`: a text file, or a directory whose text files are all read; None: the stdlib corpus."""
    if path is None:
        return stdlib_corpus(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    path = Path(path)
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise FileNotFoundError(f"--data {path}: the directory holds no files")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise ValueError(f"--data {path}: not a regular file or a directory")
    else:
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    corpus = Corpus.from_files(files, name=f"--data {path}", max_bytes=max_bytes)
    corpus.name = f"{path} ({corpus.num_files} file{'s' if corpus.num_files != 1 else ''})"
    return corpus


def split_windows(windows: Tensor) -> tuple[Tensor, Tensor]:
    """(input, target) views of (B, T + 1) windows: the target is the input shifted by one token."""
    return windows[:, :-1], windows[:, 1:]


class BatchSampler:
    """Random (input, target) windows of `seq_len` tokens from `tokens`, the target shifted by one, drawn with its
    own seeded generator (`state_dict()` / `load_state_dict()` to resume the same sequence)."""

    def __init__(self, tokens: Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{tokens.numel()} tokens are too few for windows of seq_len + 1 = {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """(input, target): two (batch_size, seq_len) int64 CPU tensors."""
        return split_windows(self.next_windows())

    def next_windows(self) -> Tensor:
        """The next batch as one (batch_size, seq_len + 1) int64 CPU tensor: input and target overlap in it, so a
        copy to a device moves it once (`split_windows` there)."""
        starts = torch.randint(self.tokens.numel() - self.seq_len, (self.batch_size,), generator=self.generator)
        return self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)].long()  # one gather

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
