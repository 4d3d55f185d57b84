"""`fused-optim train` (fused_optim/tools/training, fused_optim/tools/cli/train.py) and its example model and data.

Sizes: a 1-layer, 32-wide GPT on 16-token windows of a small text file trains a step in milliseconds, so every
test runs the real loop (both sides, checkpoints, reports) end to end; one test reads the default stdlib corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim.tools.cli import main
from fused_optim.tools.cli.train import config_from_args
from fused_optim.tools.examples.data import BatchSampler, Corpus, load_corpus, stdlib_corpus, text_files
from fused_optim.tools.examples.gpt import GPT, GPTConfig
from fused_optim.tools.training import TrainConfig, checkpoint, metrics, train
from fused_optim.tools.training.monitor import LossMonitor
from fused_optim.tools.training.report import SCHEMA, summarise

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--seq-len", "16", "--batch-size", "4",
        "--micro-batches", "2", "--steps", "6", "--warmup", "2", "--eval-interval", "3", "--eval-batches", "2",
        "--log-interval", "2", "--device", "cpu"]
TINY_CONFIG = dict(n_layer=1, n_head=2, d_model=32, seq_len=16, batch_size=4, micro_batches=2, steps=6, warmup=2,
                   eval_interval=3, eval_batches=2, log_interval=2, device="cpu")


def tiny_gpt() -> GPT:
    """The model TINY and TINY_CONFIG train."""
    return GPT(GPTConfig(seq_len=16, n_layer=1, n_head=2, d_model=32))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 40 kB of varied text (the source of this package's GPT module, repeated): enough windows for training
    and validation, read in no time."""
    source = Path(__file__).parents[1].joinpath("fused_optim", "tools", "examples", "gpt.py").read_bytes()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(source * 8)
    return path


def run_cli(*args: str) -> int:
    return main(["train", *args])


# ---- model and data ----------------------------------------------------------------------------------------------

def test_gpt_is_causal_and_ties_its_head():
    model = GPT(GPTConfig(seq_len=12, n_layer=2, n_head=2, d_model=32))
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256  # tokens from position 7 on differ
    hidden, hidden_changed = model(idx), model(changed)
    torch.testing.assert_close(hidden[:, :7], hidden_changed[:, :7])  # earlier positions cannot see them
    assert not torch.allclose(hidden[:, 7:], hidden_changed[:, 7:])
    assert model.lm_head_weight is model.token_embedding.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(n_head=3, d_model=32)


def test_stdlib_corpus_is_deterministic_and_capped():
    first, second = stdlib_corpus(max_bytes=200_000), stdlib_corpus(max_bytes=200_000)
    assert first.num_bytes == 200_000 and first.num_files > 1
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.val.numel() == 20_000  # the last 10%
    assert b"def " in first.train.numpy().tobytes()
    assert "stdlib" in first.name


def test_data_from_a_file_and_a_directory(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"second file " * 20)
    (tmp_path / "a.txt").write_bytes(b"first file " * 20)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"\x00" * 50)
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.txt"]  # sorted, caches skipped
    directory = load_corpus(tmp_path)
    tokens = torch.cat([directory.train, directory.val]).numpy().tobytes()
    assert tokens == b"first file " * 20 + b"second file " * 20 and directory.num_files == 2
    single = load_corpus(tmp_path / "b.txt", max_bytes=100)
    assert single.num_bytes == 100 and single.num_files == 1
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")


def test_data_that_is_no_regular_file_is_skipped_or_refused(tmp_path):
    """A directory's sockets, named pipes and dangling links are not read (a pipe would block the read for ever),
    and its binary files are left out; a --data path that is one, or a file that cannot be read, gets one
    sentence."""
    (tmp_path / "a.txt").write_bytes(b"some text " * 20)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # binary: git's rule, a zero byte
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.txt")
    assert [p.name for p in text_files(tmp_path)] == ["a.txt", "b.png"]
    corpus = load_corpus(tmp_path)  # the binary file left out as it is read
    assert corpus.num_bytes == 200 and corpus.num_files == 1
    with pytest.raises(ValueError, match="not a regular file or a directory"):
        load_corpus(tmp_path / "pipe")
    with pytest.raises(ValueError, match=r"--data x: cannot read .*: Is a directory"):
        Corpus.from_files([tmp_path / "a.txt", tmp_path], name="--data x")  # IsADirectoryError: an OSError


def test_batch_sampler_windows_and_state():
    corpus = Corpus.from_bytes(bytes(range(256)) * 4, name="ramp")
    sampler = BatchSampler(corpus.train, batch_size=3, seq_len=10, seed=5)
    x, y = sampler.next()
    assert x.shape == y.shape == (3, 10) and x.dtype == torch.int64
    assert torch.equal((x + 1) % 256, y)  # the target is the next byte of the ramp
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(3)]
    sampler.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, [sampler.next() for _ in range(3)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(corpus.train[:5], batch_size=1, seq_len=10, seed=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU")])])
def test_batches_reach_the_device_unchanged(device):
    # on a GPU through pinned memory, asynchronously; the same tokens as the sampler's CPU batch
    from fused_optim.tools.training.loop import batch_on

    corpus = Corpus.from_bytes(bytes(range(256)) * 4, name="ramp")
    first, second = (BatchSampler(corpus.train, batch_size=3, seq_len=10, seed=5) for _ in range(2))
    x, y = batch_on(torch.device(device), first.next_windows())
    expected_x, expected_y = second.next()
    assert x.device.type == device and torch.equal(x.cpu(), expected_x) and torch.equal(y.cpu(), expected_y)


# ---- the run -----------------------------------------------------------------------------------------------------

def test_json_schema_and_history(text_file, tmp_path):
    out = tmp_path / "run.json"
    assert run_cli(*TINY, "--data", str(text_file), "--json", str(out)) == 0
    summary = json.loads(out.read_text())
    assert summary["schema"] == SCHEMA
    assert set(summary) >= {"config", "versions", "device", "corpus", "model", "tokens_per_step",
                            "chinchilla_tokens", "runs", "compare"}
    assert summary["compare"] is None and list(summary["runs"]) == ["fused"]
    run = summary["runs"]["fused"]
    params = summary["model"]["params"]
    assert params == tiny_gpt().num_params()
    assert run["steps"] == 6 and run["tokens"] == 6 * 4 * 2 * 16 == 6 * summary["tokens_per_step"]
    assert summary["model"]["flop_params"] == params - 16 * 32  # less the (seq_len, d_model) position embedding
    assert run["flops"] == 6 * summary["model"]["flop_params"] * run["tokens"]
    assert summary["chinchilla_tokens"] == 20 * params
    assert len(run["history"]["train_loss"]) == len(run["history"]["grad_norm"]) == 6
    assert [step for step, _ in run["history"]["val"]] == [3, 6]
    assert math.isclose(run["val_perplexity"], math.exp(run["val_loss"]))
    assert math.isclose(run["train_loss"], sum(run["history"]["train_loss"]) / 6)  # the last 10 steps: all 6
    # a byte-level model starts near uniform (ln 256 = 5.55 nats) and learns within 6 steps
    assert abs(run["history"]["train_loss"][0] - math.log(256)) < 0.3
    assert run["history"]["train_loss"][-1] < run["history"]["train_loss"][0]
    assert run["tokens_per_second"] > 0 and run["mfu"] is None  # no peak is known for a CPU
    assert all(run["step_ms"][phase] > 0 for phase in ("forward", "backward", "optimizer", "total"))
    assert run["step_ms"]["total"] >= 0.99 * sum(run["step_ms"][p] for p in ("forward", "backward", "optimizer"))
    assert summary["device"]["peak_bf16_flops"] is None and summary["corpus"]["files"] == 1
    assert summary["precision"] == "fp32"  # autocast only on a GPU by default
    assert summary["backend"] == summary["config"]["backend"] == fused_optim._backend.resolve("auto", "cpu")


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Wraps owner.name (a function or method) to count its calls; returns the one-element counter."""
    calls, original = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_compare_agrees_with_torch_over_the_first_steps(text_file, tmp_path, monkeypatch):
    # each side runs its own loss and optimizer: the fused side fused_optim's, the torch side torch's, never the other
    fused_loss = _count_calls(monkeypatch, fused_optim.functional, "linear_cross_entropy")
    torch_loss = _count_calls(monkeypatch, torch.nn.functional, "cross_entropy")
    fused_steps = _count_calls(monkeypatch, fused_optim.AdamW, "step")
    torch_steps = _count_calls(monkeypatch, torch.optim.AdamW, "step")
    out = tmp_path / "compare.json"
    assert run_cli(*TINY, "--steps", "8", "--data", str(text_file), "--compare", "--json", str(out)) == 0
    losses_per_side = 8 * 2 + 3 * 2  # 8 steps of 2 micro-batches, evaluations at steps 3, 6 and 8 of 2 batches
    assert fused_loss[0] == torch_loss[0] == losses_per_side
    assert fused_steps[0] == torch_steps[0] == 8
    summary = json.loads(out.read_text())
    fused, reference = (summary["runs"][side]["history"]["train_loss"] for side in ("fused", "torch"))
    assert len(fused) == len(reference) == 8
    # fp32 on the CPU: the same objective, optimizer and clip, so only rounding differs (measured ~1e-6)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=1e-4, atol=1e-4)
    assert summary["compare"]["steps_compared"] == 8
    assert summary["compare"]["max_abs_loss_diff"] < 1e-4
    torch.testing.assert_close(torch.tensor(summary["runs"]["fused"]["history"]["grad_norm"]),
                               torch.tensor(summary["runs"]["torch"]["history"]["grad_norm"]), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_path_agrees_with_torch(text_file):
    # The GPU's precision path (the body under bf16 autocast, head and loss in fp32) run on the CPU: both sides
    # round the same matmuls to bf16, so they agree to bf16's resolution (2^-8 relative), not fp32's, and differ
    # from the fp32 run by about as much.
    config = TrainConfig(**(TINY_CONFIG | {"steps": 6}), data=str(text_file), compare=True, bf16=True)
    run = train(config)
    fused, reference = (run["results"][side].train_loss for side in ("fused", "torch"))
    fp32 = train(config.replace(bf16=False, compare=False))["results"]["fused"].train_loss
    assert summarise(run)["precision"] == "bf16 autocast"
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=1e-2, atol=1e-2)
    assert fused != fp32  # the autocast really ran
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(fp32), rtol=2e-2, atol=2e-2)
    assert fused[-1] < fused[0] - 0.05  # it learns


@pytest.mark.parametrize("compare", [False, True], ids=["fused", "fused+torch"])
def test_resume_continues_bit_exactly(text_file, tmp_path, compare):
    config = TrainConfig(**(TINY_CONFIG | {"steps": 7}), data=str(text_file), compare=compare)
    whole = train(config)
    path = tmp_path / "ckpt.pt"
    first = train(config.replace(save=str(path), stop_after=4))
    assert all(result.steps == 4 for result in first["results"].values())
    resumed = train(config.replace(resume=str(path)))
    for side, result in whole["results"].items():
        again = resumed["results"][side]
        assert again.first_step == 4 and again.steps == 7
        assert again.train_loss == result.train_loss  # bit-exact, every step
        assert again.grad_norm == result.grad_norm
        assert again.val == result.val
    saved = torch.load(path, weights_only=True)
    assert set(saved["sides"]) == ({"fused", "torch"} if compare else {"fused"})


def test_too_short_splits_fail_before_the_first_step(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_bytes(b"0123456789" * 15)  # 150 bytes: 135 to train on, 15 to validate: too few for seq_len 16
    with pytest.raises(ValueError, match=r"validation split .* 15 tokens.*--data.*10 %"):
        train(TrainConfig(**TINY_CONFIG, data=str(short)))
    with pytest.raises(ValueError, match=r"training split .* 9 tokens"):
        train(TrainConfig(**TINY_CONFIG, data=str(short), max_data_bytes=10))
    assert run_cli(*TINY, "--data", str(short)) == 2
    assert "validation split" in capsys.readouterr().err


def test_resume_refuses_a_different_run(text_file, tmp_path):
    path = tmp_path / "ckpt.pt"
    config = TrainConfig(**TINY_CONFIG, data=str(text_file), save=str(path), stop_after=2)
    train(config)
    with pytest.raises(ValueError, match=r"different run: lr \(checkpoint 0.001, now 0.002\)"):
        train(config.replace(save=None, stop_after=None, resume=str(path), lr=2e-3))
    assert run_cli(*TINY, "--data", str(text_file), "--resume", str(tmp_path / "none.pt")) == 2
    with pytest.raises(ValueError, match=r"different run: betas"):
        train(config.replace(save=None, stop_after=None, resume=str(path), betas=(0.9, 0.999)))


def test_resume_refuses_other_text_nothing_left_and_another_validation_set(text_file, tmp_path):
    """The checkpoint keeps its corpus's digest: a --data file whose bytes changed (or the default corpus of another
    Python) would go on with other batches. A checkpoint already at --stop-after (or --steps) has nothing to run, and
    --eval-batches picks the validation set of the whole history: each gets one sentence, not a silent run."""
    data, path = tmp_path / "data.txt", tmp_path / "ckpt.pt"
    data.write_bytes(text_file.read_bytes())
    config = TrainConfig(**(TINY_CONFIG | {"eval_interval": 2, "eval_batches": 2}), data=str(data))
    train(config.replace(save=str(path), stop_after=4))
    with pytest.raises(ValueError, match=r"the checkpoint is at step 4, nothing is left to train up to step 3"):
        train(config.replace(resume=str(path), stop_after=3))
    with pytest.raises(ValueError, match=r"different run: eval_batches \(checkpoint 2, now 1\)"):
        train(config.replace(resume=str(path), eval_batches=1))
    assert train(config.replace(resume=str(path)))["results"]["fused"].first_step == 4
    data.write_bytes(text_file.read_bytes()[::-1])
    with pytest.raises(ValueError, match="the training text differs from the checkpoint's run's"):
        train(config.replace(resume=str(path)))


def test_resume_takes_a_checkpoint_from_before_a_setting_existed(text_file, tmp_path):
    # a checkpoint written before --optimizer / --params / --master-weights existed was of their defaults' run
    path = tmp_path / "ckpt.pt"
    config = TrainConfig(**(TINY_CONFIG | {"steps": 4}), data=str(text_file))
    whole = train(config)
    train(config.replace(save=str(path), stop_after=2))
    checkpoint = torch.load(path, weights_only=True)
    for name in ("optimizer", "params", "master_weights"):
        del checkpoint["config"][name]
    torch.save(checkpoint, path)
    resumed = train(config.replace(resume=str(path)))
    assert resumed["results"]["fused"].train_loss == whole["results"]["fused"].train_loss
    with pytest.raises(ValueError, match=r"different run: .*optimizer \(checkpoint 'adamw', now 'lion'\)"):
        train(config.replace(resume=str(path), optimizer="lion"))


def test_lion_resumes_bit_exactly(text_file, tmp_path):
    path = tmp_path / "ckpt.pt"
    config = TrainConfig(**(TINY_CONFIG | {"steps": 5}), data=str(text_file), optimizer="lion", moments="int8")
    whole = train(config)
    train(config.replace(save=str(path), stop_after=3))
    resumed = train(config.replace(resume=str(path)))
    assert resumed["results"]["fused"].train_loss == whole["results"]["fused"].train_loss


def test_resume_refuses_other_kernels(text_file, tmp_path, monkeypatch):
    # another FUSED_OPTIM_BACKEND rounds differently: the resume would not be bit-exact, so it is refused
    path = tmp_path / "ckpt.pt"
    config = TrainConfig(**TINY_CONFIG, data=str(text_file))
    monkeypatch.setenv("FUSED_OPTIM_BACKEND", "torch")
    train(config.replace(save=str(path), stop_after=2))
    assert torch.load(path, weights_only=True)["config"]["backend"] == "torch"  # resolved, not None
    monkeypatch.delenv("FUSED_OPTIM_BACKEND")
    resolved = fused_optim._backend.resolve("auto", "cpu")
    if resolved != "torch":
        with pytest.raises(ValueError, match=rf"different run: backend \(checkpoint 'torch', now '{resolved}'\)"):
            train(config.replace(resume=str(path)))
    assert train(config.replace(resume=str(path), backend="torch"))["results"]["fused"].first_step == 2


def test_cli_resume_after_stop(text_file, tmp_path, capsys):
    path, out = tmp_path / "ckpt.pt", tmp_path / "run.json"
    assert run_cli(*TINY, "--data", str(text_file), "--save", str(path), "--stop-after", "3") == 0
    assert run_cli(*TINY, "--data", str(text_file), "--resume", str(path), "--json", str(out)) == 0
    run = json.loads(out.read_text())["runs"]["fused"]
    assert run["resumed_from"] == 3 and run["steps"] == 6
    assert "resumed at 3" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_file(text_file, tmp_path):
    out = tmp_path / "plots" / "loss.png"
    assert run_cli(*TINY, "--steps", "3", "--eval-interval", "3", "--data", str(text_file), "--compare",
                   "--plot", str(out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert run_cli(*TINY, "--steps", "3", "--eval-interval", "3", "--data", str(text_file),
                   "--plot", str(tmp_path / "curves")) == 0  # matplotlib adds the suffix: the name said is the file's
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "curves").exists()


def test_plot_without_matplotlib_says_so_before_training(text_file, monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert run_cli(*TINY, "--data", str(text_file), "--plot", "x.png") == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_quick_on_the_default_corpus(capsys):
    assert run_cli("--quick", "--steps", "4", "--warmup", "1", "--eval-interval", "4", "--device", "cpu") == 0
    table = capsys.readouterr().out
    for label in ("train loss", "val perplexity", "tokens/s", "forward", "backward", "optimizer", "params N",
                  "tokens D", "Chinchilla", "6·N·D", "MFU (6·N·D)", "position embedding", "stdlib"):
        assert label in table, label


def test_divergence_stops_the_run(text_file, tmp_path, capsys):
    # lr 1e4 without clipping: the first update throws the weights to ~1e4 and the logits overflow
    config = TrainConfig(**(TINY_CONFIG | {"steps": 10, "warmup": 0, "log_interval": 1}), data=str(text_file),
                         lr=1e4, max_grad_norm=None)
    result = train(config)["results"]["fused"]
    assert result.diverged and result.steps < 10
    assert "diverged" in result.warnings[-1]
    out = tmp_path / "diverged.json"
    capsys.readouterr()
    assert run_cli(*TINY, "--data", str(text_file), "--lr", "1e4", "--max-grad-norm", "0", "--warmup", "0",
                   "--log-interval", "1", "--json", str(out)) == 1
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("the run diverged") == 1  # each warning printed once

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    run = json.loads(out.read_text(), parse_constant=reject)["runs"]["fused"]  # strict JSON: no NaN or Infinity
    assert run["diverged"] and run["history"]["train_loss"][-1] is None  # the non-finite loss, as null


# ---- pieces ------------------------------------------------------------------------------------------------------

def test_loss_monitor():
    monitor = LossMonitor(spike_factor=1.5)
    assert monitor.check(1, 5.0) is None and monitor.check(2, 2.0) is None
    assert monitor.check(3, 2.9) is None  # below 1.5x the lowest
    assert "spike" in monitor.check(4, 3.1)
    assert not monitor.diverged
    assert "diverged" in monitor.check(5, math.inf) and monitor.diverged
    assert monitor.check(6, math.nan) is None and monitor.diverged  # said once
    assert monitor.lowest == 2.0
    restored = LossMonitor(spike_factor=1.5)
    restored.load_state_dict(monitor.state_dict())
    assert restored.diverged and restored.lowest == 2.0 and restored.warnings == monitor.warnings


def test_metrics():
    assert metrics.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_of("NVIDIA H100 NVL") == 835e12  # not the SXM's 989
    assert metrics.peak_flops_of("NVIDIA H200 NVL") == 835e12
    assert metrics.peak_flops_of("NVIDIA H200") == 989e12
    assert metrics.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.peak_flops_of("NVIDIA L40") == 181e12  # not the L4's 121
    assert metrics.peak_flops_of("NVIDIA L40S") == 362e12
    assert metrics.peak_flops_of("NVIDIA L4") == 121e12
    assert metrics.peak_flops_of("Tesla T4") is None
    assert metrics.peak_flops(torch.device("cpu")) is None
    assert metrics.mfu(1_000_000, 1e6, 1e13) == pytest.approx(0.6)  # 6·1e6·1e6 FLOP/s of 1e13
    assert metrics.mfu(1_000_000, 1e6, None) is None
    assert metrics.perplexity(0.0) == 1.0 and metrics.perplexity(1e4) == math.inf


def test_quick_defaults_yield_to_explicit_flags():
    from fused_optim.tools.cli import _parser

    config = config_from_args(_parser().parse_args(["train", "--quick", "--steps", "12", "--max-grad-norm", "0"]))
    assert (config.steps, config.d_model, config.n_layer, config.max_grad_norm) == (12, 64, 2, None)
    assert config_from_args(_parser().parse_args(["train"])) == TrainConfig()
    assert run_cli("--steps", "0") == 2
    # fewer steps than the default warmup: it warms up throughout; a warmup given longer than the run is refused
    for flags in (["--quick"], []):
        assert config_from_args(_parser().parse_args(["train", *flags, "--steps", "2"])).warmup == 2
    assert run_cli("--steps", "2", "--warmup", "3") == 2


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    text = capsys.readouterr().out
    for flag in ("--steps", "--batch-size", "--micro-batches", "--seq-len", "--lr", "--warmup", "--weight-decay",
                 "--max-grad-norm", "--n-layer", "--n-head", "--d-model", "--device", "--seed", "--compare",
                 "--save", "--resume", "--plot", "--json", "--data", "--eval-interval", "--quick"):
        assert flag in text, flag


def test_every_train_flag_has_a_help_text():
    from fused_optim.tools.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in subparsers.choices["train"]._actions if a.option_strings != ["-h", "--help"]]
    assert len(actions) >= 20
    for action in actions:
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, action.option_strings


@pytest.mark.parametrize("side", ["fused", "torch"])
def test_token_count_normalisation_ignores_the_micro_batch_split(text_file, side):
    # 8 sequences as 8 x 1, 4 x 2 or 2 x 4 micro-batches: the same windows (the sampler's generator draws the
    # same starts in one draw of 8 as in several smaller ones), so the same mean loss and gradient
    corpus = load_corpus(text_file)
    whole = BatchSampler(corpus.train, batch_size=8, seq_len=16, seed=0).next_windows()
    quarters = BatchSampler(corpus.train, batch_size=2, seq_len=16, seed=0)
    assert torch.equal(whole, torch.cat([quarters.next_windows() for _ in range(4)]))
    firsts = []
    for batch_size, micro_batches in ((8, 1), (4, 2), (2, 4)):
        config = TrainConfig(**(TINY_CONFIG | {"steps": 1, "warmup": 0, "eval_interval": 1, "log_interval": 1,
                                               "batch_size": batch_size, "micro_batches": micro_batches}),
                             data=str(text_file), compare=side == "torch")
        result = train(config, corpus=corpus)["results"][side]
        firsts.append((result.train_loss[0], result.grad_norm[0]))
    for loss, norm in firsts[1:]:
        assert loss == pytest.approx(firsts[0][0], rel=1e-6, abs=1e-6)
        assert norm == pytest.approx(firsts[0][1], rel=1e-6, abs=1e-6)
    assert firsts[0][1] > 0


def test_a_data_name_with_brackets_is_printed_as_it_is(text_file, tmp_path, capsys):
    """rich reads brackets as markup: the table's caption escapes the --data name (it showed "corpus[v2].txt" as
    "corpus.txt", and a closing tag such as "[/]" raised after the whole run)."""
    data = tmp_path / "corpus[v2]" / "[bold]notes.txt"
    data.parent.mkdir()
    data.write_bytes(text_file.read_bytes())
    assert run_cli(*TINY, "--steps", "2", "--data", str(data)) == 0
    assert "corpus[v2]/[bold]notes.txt" in capsys.readouterr().out.replace("\n", "")


def test_python_dash_m_runs_train(text_file, tmp_path):
    out = tmp_path / "run.json"
    done = subprocess.run([sys.executable, "-m", "fused_optim", "train", *TINY, "--steps", "2", "--eval-interval",
                           "2", "--data", str(text_file), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["runs"]["fused"]["steps"] == 2


def test_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a fused-optim train checkpoint"):
        checkpoint.load(path, TrainConfig(), "digest")
    path.write_text('{"not": "a torch.save file"}')  # nor one torch.load can read at all
    with pytest.raises(ValueError, match="not a fused-optim train checkpoint"):
        checkpoint.load(path, TrainConfig(), "digest")


def test_bad_outputs_devices_and_data_are_refused_before_training(text_file, tmp_path, capsys):
    """One line and status 2, before any step (a --json to a directory failed after the whole run, losing it)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for flags, message in (
            (("--json", str(tmp_path)), "is a directory; give a file name"),
            (("--save", str(tmp_path)), "is a directory; give a file name"),
            (("--json", str(empty / "run.json")), f"{empty} is a file, not a folder"),
            (("--save", str(empty / "deeper" / "run.pt")), f"{empty} is a file, not a folder"),
            (("--plot", str(tmp_path / "loss.v2")), "matplotlib does not save '.v2' files; end the name with one of"),
            (("--device", "meta"), "--device meta: the training runs on cpu or cuda"),
            (("--device", "tpu"), "--device tpu: not a device"),
            (("--master-weights", "24"), "--master-weights 24 keeps the masters of bf16 params: it needs --params"),
    ):
        assert run_cli(*TINY, "--data", str(text_file), *flags) == 2
        assert message in capsys.readouterr().err
    assert run_cli(*TINY, "--data", str(empty)) == 2
    assert f"--data {empty}: no text to train on" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))


def test_summary_of_a_run_without_compare_has_no_agreement(text_file):
    run = train(TrainConfig(**(TINY_CONFIG | {"steps": 2, "eval_interval": 2}), data=str(text_file)))
    assert summarise(run)["compare"] is None


def test_cli_lets_unexpected_errors_raise(text_file, monkeypatch):
    # a bug is not a bad flag: it keeps its traceback instead of becoming one line and exit status 2
    import fused_optim.tools.training

    def broken(config, reporter=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(fused_optim.tools.training, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(*TINY, "--data", str(text_file))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no GPU is visible")
def test_device_cuda_without_a_gpu_says_so(text_file, capsys):
    assert run_cli(*TINY, "--data", str(text_file), "--device", "cuda") == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


@pytest.mark.parametrize("master_weights", ["off", "exact", "24"])
def test_bf16_params_train_with_each_master_weight_mode(text_file, master_weights):
    """--params bf16: the fused side's model in bf16, stepped by AdamW with the chosen master weights (and int8
    moments with 24-bit masters: the 3-byte recipe); it learns as the fp32 model does, to bf16's resolution."""
    from fused_optim.tools.cli import _parser

    config = config_from_args(_parser().parse_args(
        ["train", *TINY, "--data", str(text_file), "--params", "bf16", "--master-weights", master_weights,
         "--moments", "int8" if master_weights == "24" else "fp32"]))
    assert config.master_weights == {"off": False, "exact": True, "24": 24}[master_weights]
    run = train(config)
    losses = run["results"]["fused"].train_loss
    fp32 = train(config.replace(params="fp32", master_weights=False, moments="fp32"))["results"]["fused"].train_loss
    assert summarise(run)["precision"] == "fp32 · bf16 params"
    assert losses != fp32  # the bf16 model really ran
    assert losses[-1] < losses[0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(fp32), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_gradient_release_trains_bit_for_bit_as_the_step_after_backward(text_file, optimizer, capsys):
    """--gradient-release: the fused optimizer steps each param inside the last micro-batch's backward, from the
    accumulator's main grad divided by the step's token count; the losses (train and validation) are bit for bit
    those of finalize() + step() after it, both unclipped, here with int8 moments and 24-bit masters on bf16
    params. With clipping on, the CLI refuses in one sentence before training."""
    from fused_optim.tools.cli import _parser

    flags = ["train", *TINY, "--data", str(text_file), "--optimizer", optimizer, "--params", "bf16",
             "--master-weights", "24", "--moments", "int8", "--max-grad-norm", "0"]
    config = config_from_args(_parser().parse_args([*flags, "--gradient-release"]))
    assert config.gradient_release and not config_from_args(_parser().parse_args(flags)).gradient_release
    released = train(config)["results"]["fused"]
    stepped = train(config.replace(gradient_release=False))["results"]["fused"]
    assert released.train_loss == stepped.train_loss and released.val == stepped.val
    with warnings.catch_warnings():  # step() is called (it steps nothing): the scheduler warned of a skipped lr
        warnings.simplefilter("error")
        train(config)
    assert released.train_loss != train(config.replace(gradient_release=False, max_grad_norm=1.0))[
        "results"]["fused"].train_loss  # the comparison can tell runs apart: clipping moves these losses
    assert run_cli(*TINY, "--data", str(text_file), "--gradient-release") == 2
    assert "it cannot clip by their global norm: turn max_grad_norm off (--max-grad-norm 0)" in capsys.readouterr().err


def test_master_weights_need_bf16_params():
    with pytest.raises(ValueError, match=r"^master_weights must be False, True or 24, and only with bf16 params"):
        TrainConfig(master_weights=24)
    with pytest.raises(ValueError, match=r"^params must be 'fp32' or 'bf16'"):
        TrainConfig(params="fp16")


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_lion_trains_with_its_own_defaults(text_file, moments):
    """--optimizer lion: the fused side steps fused_optim.Lion (tensor lr, in-step clipping) with Lion's lr, decay
    and betas where none are given, and learns."""
    from fused_optim.tools.cli import _parser
    from fused_optim.tools.training.recipes import FusedRecipe

    config = config_from_args(_parser().parse_args(
        ["train", *TINY, "--data", str(text_file), "--optimizer", "lion", "--moments", moments, "--lr", "3e-4"]))
    assert (config.lr, config.weight_decay, config.betas) == (3e-4, 1.0, (0.9, 0.99))
    recipe = FusedRecipe(tiny_gpt(), config, torch.device("cpu"))
    assert isinstance(recipe.optimizer, fused_optim.Lion)
    assert recipe.optimizer.defaults["moments"] == moments
    assert isinstance(recipe.optimizer.param_groups[0]["lr"], torch.Tensor)
    losses = train(config)["results"]["fused"].train_loss
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.05


def test_optimizer_defaults_and_refusals():
    assert (TrainConfig().lr, TrainConfig().weight_decay, TrainConfig().betas) == (1e-3, 0.1, (0.9, 0.95))
    with pytest.raises(ValueError, match=r"^optimizer must be one of adamw, lion, got 'sgd'$"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"^compare trains torch's AdamW beside the fused AdamW; it has no lion twin$"):
        TrainConfig(optimizer="lion", compare=True)
    # replace() switching the optimizer takes the new one's defaults for what the run did not set, keeps what it did
    lion = TrainConfig(lr=3e-4).replace(optimizer="lion")
    assert (lion.lr, lion.weight_decay, lion.betas) == (3e-4, 1.0, (0.9, 0.99))
    assert TrainConfig(optimizer="lion").replace(optimizer="adamw").as_dict() == TrainConfig().as_dict()


@pytest.mark.parametrize("compare_optimizer, package", [("torchao-adamw8bit", "torchao"),
                                                       ("bnb-adamw8bit", "bitsandbytes")])
def test_compare_with_an_8_bit_adamw_peer(text_file, compare_optimizer, package):
    """--compare-optimizer: the --compare side steps another package's 8-bit AdamW (the issue's quality peers)."""
    pytest.importorskip(package)
    from fused_optim.tools.cli import _parser
    from fused_optim.tools.training.recipes import TorchRecipe

    config = config_from_args(_parser().parse_args(
        ["train", *TINY, "--data", str(text_file), "--compare", "--compare-optimizer", compare_optimizer,
         "--moments", "int8"]))
    recipe = TorchRecipe(tiny_gpt(), config, torch.device("cpu"))
    assert type(recipe.optimizer).__name__ == "AdamW8bit" and package in type(recipe.optimizer).__module__
    losses = train(config)["results"]["torch"].train_loss
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


def test_compare_optimizer_refusals(monkeypatch):
    with pytest.raises(ValueError, match=r"^compare_optimizer must be one of adamw, torchao-adamw8bit, bnb-adamw8bit"):
        TrainConfig(compare=True, compare_optimizer="adam8bit")
    with pytest.raises(ValueError, match=r"^compare_optimizer bnb-adamw8bit is the --compare side's: it needs compare$"):
        TrainConfig(compare_optimizer="bnb-adamw8bit")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"^compare_optimizer torchao-adamw8bit needs torchao, which is not installed$"):
        TrainConfig(compare=True, compare_optimizer="torchao-adamw8bit")


def test_plot_runs_draws_each_reports_validation_curve(text_file, tmp_path):
    from fused_optim.tools.training.plot import plot_runs, run_label

    reports = []
    for options in (["--moments", "int8"], ["--params", "bf16", "--master-weights", "24"], ["--optimizer", "lion"]):
        reports.append(tmp_path / f"run{len(reports)}.json")
        assert run_cli(*TINY, "--data", str(text_file), *options, "--json", str(reports[-1])) == 0
    labels = [run_label(json.loads(path.read_text())["config"]) for path in reports]
    assert labels == ["fp32 params, int8 moments", "bf16 params, 24-bit masters, fp32 moments",
                      "Lion, fp32 params, fp32 moments"]
    out = tmp_path / "runs.png"
    plot_runs([str(path) for path in reports], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
