"""`fused-optim bench` for the accumulate, clip_adamw, sgd and lion ops: the command runs end to end at tiny sizes and
writes the JSON report its rows promise (and the --plot PNG), absent peers are listed, and a wrong implementation is
reported as wrong and not timed. The FSDP2 ops run in 2 spawned gloo ranks, at a tiny size too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_optim.tools.bench import absent_peers, accumulate, clip_adamw, fsdp, sgd
from fused_optim.tools.bench.adamw import Runner
from fused_optim.tools.bench.peers import Impl, apex_peer
from fused_optim.tools.bench.plot import bars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The directory of one tiny `fused-optim bench` run: report.json and, with matplotlib, plot.png."""
    directory = tmp_path_factory.mktemp("bench")
    plot = ["--plot", str(directory / "plot.png")] if HAS_MATPLOTLIB else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "fused_optim", "bench", "--ops", "accumulate,clip_adamw,sgd,lion", "--quick", "--device",
         "cpu", "--sizes", "4099", "--json", str(directory / "report.json"), *plot],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _rows(report: dict, op: str) -> list[dict]:
    return [r for r in report["rows"] if r["op"] == op]


def _check_timed_row(row: dict) -> None:
    """A row that ran: checked correct, timed, and its derived columns follow from its time and bytes model."""
    assert row["correct"] is True, row
    assert row["time_ms_median"] > 0 and row["time_ms_iqr"] >= 0 and row["n_timed"] >= 5, row
    assert row["gbps"] == pytest.approx(row["bytes"] / (row["time_ms_median"] * 1e6))


def test_report_schema(report):
    assert report["schema"] == 1 and report["device_type"] == "cpu"
    assert report["config"]["ops"] == ["accumulate", "clip_adamw", "sgd", "lion"]
    assert report["config"]["accumulate"]["bytes_per_element"] == {"bf16": 10, "fp32": 12}
    assert report["config"]["clip_adamw"]["bytes_per_param"] == 32
    assert report["config"]["sgd"]["bytes_per_param"] == 20
    assert report["config"]["sgd"]["hparams"]["momentum"] == 0.9
    assert report["config"]["lion"]["bytes_per_param"] == 20
    assert {r["op"] for r in report["rows"]} == {"accumulate", "clip_adamw", "sgd", "lion"}
    absent = {(r["op"], r["impl"]) for r in report["rows"]
              if r["note"].startswith("absent") and not r["impl"].startswith("fused_optim")}
    assert {(peer["op"], peer["impl"]) for peer in report["absent_peers"]} == absent


# Our optimizers with bf16 moments (2 bytes read and written) and int8 ones (1, and a bf16 scale per 64), at 4099
COMPRESSED = {"fused_optim[cpu] moments=bf16": 16 * 4099, "fused_optim[cpu] moments=int8": round(4099 * (14 + 4 / 64))}


def test_sgd_rows(report):
    rows = _rows(report, "sgd")
    assert {r["n_params"] for r in rows} == {4099}
    for r in rows:
        assert r["bytes"] == COMPRESSED.get(r["impl"], 20 * 4099), r
    timed = [r for r in rows if r["time_ms_median"]]
    for r in timed:
        _check_timed_row(r)
        if r["impl"] in COMPRESSED:  # rounded buffers move the params: the whole update, in the 2-norm
            assert r["update_error"] < 0.1 and r["note"].startswith("update off by"), r
        else:
            assert r["max_abs_err"] < 1e-7
    assert {"torch foreach", "torch for-loop", *COMPRESSED} <= {r["impl"] for r in timed}
    assert any(r["impl"].startswith("fused_optim") for r in timed)
    fused = next(r for r in rows if r["impl"] == "torch fused")
    baseline = "torch fused" if fused["time_ms_median"] else "torch foreach"
    assert [r["impl"] for r in rows if r["baseline"]] == [baseline]
    for r in rows:  # untimed: absent (with the reason), never silently
        assert r["time_ms_median"] or r["note"].startswith("absent"), r


def test_lion_rows(report):
    rows = _rows(report, "lion")
    assert {r["n_params"] for r in rows} == {4099}
    for r in rows:
        assert r["bytes"] == COMPRESSED.get(r["impl"], 20 * 4099), r
    timed = [r for r in rows if r["time_ms_median"]]
    for r in timed:
        _check_timed_row(r)
        assert r["max_abs_err"] < 1e-7  # a rounded moment does not flip the check's directions (bench/lion.py)
        assert r["note"].startswith("moments off by") == (r["impl"] in COMPRESSED), r
    assert {"torch foreach Lion", "lion-pytorch", "fused_optim[cpu]", *COMPRESSED} <= {r["impl"] for r in timed}
    assert [r["impl"] for r in rows if r["baseline"]] == ["torch foreach Lion"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_file(run_dir):
    png = (run_dir / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_without_matplotlib_says_so_before_measuring(monkeypatch, capsys):
    from fused_optim.tools.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert main(["bench", "--ops", "sgd", "--device", "cpu", "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_without_a_suffix_is_checked_and_said_as_the_png_written(tmp_path, capsys):
    from fused_optim.tools.cli import main

    (tmp_path / "plot.png").mkdir()  # matplotlib would write plot.png for "plot": that name is refused up front
    assert main(["bench", "--ops", "sgd", "--device", "cpu", "--plot", str(tmp_path / "plot")]) == 2
    assert f"--plot {tmp_path / 'plot.png'}: is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["inf", "1e400", "nan", "-5", "0.5", "abc"])
def test_a_size_that_is_not_a_count_of_params_is_one_line(size, capsys):
    from fused_optim.tools.cli import main

    assert main(["bench", "--ops", "sgd", "--device", "cpu", "--sizes", size]) == 2
    assert capsys.readouterr().err.startswith(f"fused-optim bench: --sizes: not a size: {size.upper()!r} (a count ")


def test_best_time_cpu_times_calls_after_one_untimed_call():
    from fused_optim.tools.bench.timing import best_time_cpu

    calls = []
    seconds = best_time_cpu(lambda: calls.append(1), calls=4, repeats=3)
    assert len(calls) == 1 + 4 * 3 and 0 < seconds < 0.1


def test_sizes_no_op_asked_takes_are_said_ignored(tmp_path, capsys):
    from fused_optim.tools.cli import main

    (tmp_path / "plot.png").mkdir()  # refused up front, after the sizes are read: nothing is measured
    flags = ["--ops", "ce", "--device", "cpu", "--sizes", "1M,8x16", "--plot", str(tmp_path / "plot")]
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert "no op asked (ce) takes --sizes of the form N: 1000000 ignored" in err and "NxV" not in err


def test_plot_draws_only_rows_with_bandwidth():
    def row(op, impl, gbps, correct=True, **fields):
        return {"op": op, "case": "fp32", "impl": impl, "gbps": gbps, "correct": correct, **fields}
    report = {"rows": [row("sgd", "ours", 10.0, n_params=4099), row("sgd", "wrong", 99.0, correct=False),
                       row("sgd", "absent", None, correct=None), row("ce", "ours", 5.0, shape="8×16")]}
    assert bars(report) == {"sgd fp32 4.1K": {"ours": 10.0}, "ce fp32 8×16": {"ours": 5.0}}


def test_absent_peers():
    rows = [{"op": "ce", "impl": "Liger-Kernel", "note": "absent (liger-kernel is not installed)"},
            {"op": "ce", "impl": "Liger-Kernel", "note": "absent (liger-kernel is not installed)"},
            {"op": "sgd", "impl": "fused_optim[cpu]", "note": "absent (no kernel)"},
            {"op": "sgd", "impl": "torch foreach", "note": ""}]
    assert absent_peers(rows) == [{"op": "ce", "impl": "Liger-Kernel", "why": "absent (liger-kernel is not installed)"}]


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="apex is installed")
def test_apex_is_a_gpu_peer_said_absent():
    assert apex_peer("apex FusedSGD", "FusedSGD", CPU, lambda optimizer_class: None) is None  # CUDA only: no row
    impl = apex_peer("apex FusedSGD", "FusedSGD", torch.device("cuda"), lambda optimizer_class: None)
    assert impl.build is None and impl.unavailable == "absent (apex is not installed)"
    names = [impl.name for impl in sgd.implementations(CPU)]
    assert "apex FusedSGD" not in names and {"torch foreach", "torch for-loop"} <= set(names)


def test_accumulate_rows(report):
    rows = _rows(report, "accumulate")
    cases = {(r["case"], r["shape"], r["n_tensors"]) for r in rows}
    layouts = (("4.1K", 1), ("2000×4096", 2000))  # --sizes 4099, then 2,000 tensors of 4,096
    assert cases == {(dtype, shape, n) for dtype in ("bf16", "fp32") for shape, n in layouts}
    for r in rows:
        assert r["bytes"] == r["n_params"] * {"bf16": 10, "fp32": 12}[r["case"]]
        if r["note"].startswith("absent"):  # a backend whose kernel is not registered here: shown, not run
            assert r["impl"].startswith("fused_optim[") and r["time_ms_median"] is None
            continue
        _check_timed_row(r)
    for case in {(r["case"], r["shape"]) for r in rows}:
        group = [r for r in rows if (r["case"], r["shape"]) == case]
        impls = {r["impl"] for r in group if r["time_ms_median"]}
        assert {"torch add_ loop", "torch _foreach_add_"} <= impls
        assert any(name.startswith("fused_optim") for name in impls)  # ours ran, on some backend
        baseline = next(r for r in group if r["baseline"])
        assert baseline["impl"] == "torch add_ loop" and baseline["speedup_vs_baseline"] == pytest.approx(1.0)
        ours = next(r for r in group if r["impl"].startswith("fused_optim") and r["time_ms_median"])
        assert set(ours["speedup_vs"]) == {"torch add_ loop", "torch _foreach_add_"}


def test_clip_adamw_rows(report):
    rows = _rows(report, "clip_adamw")
    assert {r["n_params"] for r in rows} == {4099}
    timed = [r for r in rows if r["time_ms_median"]]
    for r in rows:
        assert r["bytes"] == 32 * 4099
        if r["note"].startswith("absent"):
            assert r["impl"].startswith("fused_optim[") and r["time_ms_median"] is None
    for r in timed:
        _check_timed_row(r)
        assert r["max_abs_err"] < 1e-6
    assert any(r["impl"].startswith("fused_optim") for r in timed)
    assert [r["impl"] for r in timed if r["baseline"]] == [r["impl"] for r in rows if r["impl"].startswith("torch")]


def test_accumulate_wrong_implementation_is_not_timed(monkeypatch):
    def adds_twice(w):
        mains = [m.clone() for m in w.mains0]
        return (lambda: (torch._foreach_add_(mains, w.grads), torch._foreach_add_(mains, w.grads))), mains

    def three_ulps_off(w):  # at least 2.5 ulps from the exact sum: past the one-ulp tolerance whatever the value
        mains = [m.clone() for m in w.mains0]

        def step():
            torch._foreach_add_(mains, w.grads)
            for m in mains:
                for _ in range(3):
                    m.copy_(torch.nextafter(m, m * 2))
        return step, mains

    monkeypatch.setattr(accumulate, "MANY_SHAPES", [(5,)] * 3)
    monkeypatch.setattr(accumulate, "implementations", lambda device: [
        Impl("adds twice", adds_twice), Impl("three ulps off", three_ulps_off),
        Impl("torch add_ loop", accumulate._add_loop, baseline=True)])
    config = accumulate.AccumulateConfig(device=CPU, sizes=[1000], dtypes=("bf16",), budget_s=0.01)
    rows = accumulate.run(config)
    assert len(rows) == 6
    for r in rows:
        if r["impl"] == "torch add_ loop":
            _check_timed_row(r)
        else:
            assert r["correct"] is False and r["time_ms_median"] is None and "wrong result" in r["note"], r


def test_clip_adamw_without_clipping_is_wrong(monkeypatch):
    def no_clip(w, scale, grad_factor):
        params = clip_adamw._params(w, grad_factor)
        scaler = clip_adamw._scaler(torch.amp.GradScaler, w.device, scale)
        opt = torch.optim.AdamW(params, **clip_adamw.HPARAMS, foreach=True)

        def step():
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        return step, params

    monkeypatch.setattr(clip_adamw, "implementations", lambda device: [
        Impl("no clip", no_clip), Impl("torch", clip_adamw._torch_sequence(foreach=True), baseline=True)])
    rows = clip_adamw.run(clip_adamw.ClipAdamWConfig(device=CPU, sizes=[3000], budget_s=0.01))
    wrong, right = rows
    assert wrong["correct"] is False and wrong["time_ms_median"] is None and "wrong result" in wrong["note"]
    _check_timed_row(right)


def test_sgd_without_momentum_is_wrong(monkeypatch):
    def no_momentum(w):  # plain SGD: its "buffer" is the grad (the first step is right, the second not)
        params = sgd._clone_params(w)
        opt = torch.optim.SGD(params, lr=sgd.HPARAMS["lr"])
        return Runner(opt.step, lambda: params + [p.grad for p in params], lambda: torch.float32, params)

    monkeypatch.setattr(sgd, "implementations", lambda device: [
        Impl("no momentum", no_momentum), Impl("torch foreach", sgd._torch(foreach=True), baseline=True)])
    rows = sgd.run(sgd.SGDConfig(device=CPU, sizes=[3000], budget_s=0.01))
    wrong, right = rows
    assert wrong["correct"] is False and wrong["time_ms_median"] is None and "wrong result" in wrong["note"], wrong
    _check_timed_row(right)


def _fake_report(rows: list[dict]) -> dict:
    """A report as run_benchmarks returns it, with `rows` (no measuring)."""
    return {"schema": 1, "device": "test CPU", "device_type": "cpu", "roof": {"kind": "triad", "gbps": 10.0},
            "load_avg": {}, "absent_peers": [], "config": {}, "rows": rows}


def _linear_ce_row(**fields) -> dict:
    return {"op": "linear_ce", "case": "fp32", "impl": "fused_optim[cpu]", "shape": "64×32×512", "bytes": None,
            "gbps": None, "time_ms_median": 1.0, "time_ms_iqr": 0.1, "correct": True, "note": "", **fields}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_of_linear_ce_alone_says_so_and_keeps_the_json(monkeypatch, tmp_path, capsys):
    from fused_optim.tools import bench
    from fused_optim.tools.cli import main

    monkeypatch.setattr(bench, "run_benchmarks", lambda *a, **k: _fake_report([_linear_ce_row()]))
    json_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["bench", "--ops", "linear_ce", "--device", "cpu", "--json", str(json_path),
                 "--plot", str(png_path)]) == 0
    err = capsys.readouterr().err
    assert "no row has a GB/s" in err and "linear_ce (no bytes model)" in err and "no plot written" in err
    assert json.loads(json_path.read_text())["rows"][0]["op"] == "linear_ce"
    assert not png_path.exists()


def test_plot_names_the_ops_it_leaves_out():
    from fused_optim.tools.bench.plot import undrawn_ops

    sgd_row = {"op": "sgd", "case": "fp32", "impl": "ours", "gbps": 10.0, "bytes": 100, "correct": True}
    wrong = {"op": "ce", "case": "fp32", "impl": "ours", "gbps": None, "bytes": 100, "correct": False}
    assert undrawn_ops({"rows": [sgd_row, _linear_ce_row(), wrong]}) == [
        "linear_ce (no bytes model)", "ce (no correct timed row)"]


def test_json_is_strict_with_nonfinite_floats_as_null(tmp_path):
    from fused_optim.tools import bench

    row = _linear_ce_row(max_abs_err=float("nan"), correct=False, speedup_vs={"torch": float("inf")},
                         tolerance=(1e-5, float("-inf")))
    path = tmp_path / "r.json"
    bench.write_json(_fake_report([row]), path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert written["rows"][0]["max_abs_err"] is None
    assert written["rows"][0]["speedup_vs"] == {"torch": None}
    assert written["rows"][0]["tolerance"] == [1e-5, None]
    assert written["rows"][0]["time_ms_median"] == 1.0


def _adam_config(**fields):
    from fused_optim.tools.bench import adamw

    return adamw.AdamWConfig(device=CPU, sizes=[4099], cases=("fp32",), budget_s=0.02, variant=adamw.ADAM, **fields)


def test_adam_rows_are_torch_adam_checked():
    from fused_optim.tools.bench import adamw

    rows = adamw.run(_adam_config())
    assert {r["op"] for r in rows} == {"adam"} and all(r["n_params"] == 4099 for r in rows)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["torch for-loop"]["note"] == "reference"
    for impl in ("fused_optim[cpu]", "torch foreach", "torch for-loop"):
        _check_timed_row(by_impl[impl])
        assert by_impl[impl]["bytes"] == 28 * 4099
    assert adamw.implementations("fp32", CPU, adamw.ADAM)[0].name == "fused_optim[cpu]"


def test_adam_with_decoupled_decay_is_wrong(monkeypatch):
    """AdamW's step posing as Adam's (decay decoupled, not folded into the grad) fails the check and is not timed."""
    from fused_optim.tools.bench import adamw

    monkeypatch.setattr(adamw, "_ours", lambda backend, variant=adamw.ADAMW, moments="fp32":
                        adamw._torch(adamw.ADAMW, foreach=True))
    ours = next(r for r in adamw.run(_adam_config()) if r["impl"] == "fused_optim[cpu]")
    assert ours["correct"] is False and ours["time_ms_median"] is None
    assert ours["max_abs_err"] > 10 * adamw.COUPLED_DECAY_ATOL and ours["note"].startswith("wrong result")


@pytest.mark.parametrize("op", ["adamw", "adam", "sgd"])
def test_torch_compile_of_the_step_is_a_peer_on_gpus_only(op):
    from fused_optim.tools.bench import adamw

    def names(device):
        if op == "sgd":
            return [impl.name for impl in sgd.implementations(device)]
        impls = adamw.implementations("fp32", device, adamw.VARIANTS[op])
        return [impl.name for impl in impls]
    assert "torch.compile foreach" not in names(CPU)  # no GPU needed: the list is only built, nothing runs on it
    assert "torch.compile foreach" in names(torch.device("cuda"))
    if op != "sgd":  # nor over the host case's 1,000 tensors, whose compile alone outlasts the benchmark
        host = adamw.implementations("host", torch.device("cuda"), adamw.VARIANTS[op])
        assert "torch.compile foreach" not in [impl.name for impl in host]


@pytest.mark.parametrize("op", ["adamw", "sgd"])
def test_compiled_step_starts_from_the_workload(monkeypatch, op):
    """The compiled peer's warm-up steps (the compiles) are undone before the check: with torch.compile as the
    identity (compiling an optimizer step on the CPU takes long), it passes the same check as torch's foreach."""
    from fused_optim.tools.bench import adamw

    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    w = adamw.make_workload("fp32", 4099, CPU)
    if op == "sgd":
        row = {"note": ""}
        assert sgd.checked_step(Impl("compiled", sgd._compiled), w, sgd.reference(w), row) is not None, row
        return
    reference = adamw._torch(foreach=False)(w)
    adamw._check_steps(reference, 2, CPU)
    runner = adamw._compiled()(w)
    adamw._check_steps(runner, 2, CPU)
    row = {"note": ""}
    adamw._check("fp32", runner, reference.result(), row)
    assert row["correct"] is True, row


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp_rows_are_checked_timed_and_count_collectives():
    rows = fsdp.run(fsdp.FSDPConfig(device=CPU, sizes=[4099], budget_s=0.05), roof_gbps=40.0)
    assert {r["op"] for r in rows} == {"fsdp_adamw", "fsdp_clip_adamw"}
    for r in rows:
        _check_timed_row(r)
        assert r["max_abs_err"] <= fsdp.TOLERANCES[r["op"]]
        assert r["bytes"] == r["n_params"] * (32 if r["op"] == "fsdp_clip_adamw" else 28)
    ours = {r["op"]: r for r in rows if r["impl"].startswith("fused_optim")}
    assert ours["fsdp_adamw"]["collectives_per_step"] == 0  # the update needs nothing from the other rank
    assert ours["fsdp_clip_adamw"]["collectives_per_step"] == 1  # the global norm: one all-reduce
    assert all(r["speedup_vs"] for r in ours.values())
