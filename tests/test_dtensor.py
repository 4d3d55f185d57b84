"""The optimizers, clipping, norms and GradAccumulator on DTensors (fused_optim/ops/_dtensor.py): FSDP2, a 2-D
FSDP x tensor-parallel mesh, torch.distributed.checkpoint with resharding, ZeroRedundancyOptimizer, and the bad
inputs, in gloo processes on the CPU.

Every run is compared with torch's own optimizer on the same mesh and with the single-process run of the same model
on the same data (computed here, in the test process): params equal to 1e-6 after several steps. The model is
Linear(5, 7) -> tanh -> Linear(7, 3): 7 and 3 rows do not divide by 2 or 4, so the shards are uneven, and on 4
ranks the last shard of the 3-element bias is empty. Each rank takes its slice of the same 8-row batches and FSDP2
averages the gradients, which gives the full batch's mean-loss gradient of the single process.

Two spawns per module (4 ranks, then 2: the 2-rank run loads the checkpoint the 4-rank run saved); the tests read
their results.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import master_weight
from spawn import GLOO_AVAILABLE, run_workers
from token_batches import IGNORE, classifier, rank_micro_batches

import fused_optim
from fused_optim.tools.bench.fsdp import CountCollectives
from fused_optim.ops.adam import adam_step
from fused_optim.ops.total_norm import total_norm

pytestmark = pytest.mark.skipif(not GLOO_AVAILABLE, reason="torch.distributed with gloo is not available")

if GLOO_AVAILABLE:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

FEATURES, HIDDEN, OUT, ROWS = 5, 7, 3, 8
TP_HIDDEN = 8  # tensor parallelism shards the hidden features evenly (DTensor's row-parallel input must)
STEPS = 3
MAX_NORM = 0.05  # below the gradients' norm: every clipped step clips
NORM_TYPES = (1.0, 2.0, 3.5, math.inf)

# name -> (our class, kwargs for both, kwargs only ours takes, clip before torch's step)
OPTIMIZERS = {
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.1), {}, None),
    "adam-amsgrad-maximize": ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
                              dict(capturable=True), None),
    "adamw-clip": ("AdamW", dict(lr=1e-2, weight_decay=0.1), dict(max_grad_norm=MAX_NORM), MAX_NORM),
    "sgd": ("SGD", dict(lr=0.1), {}, None),
    "sgd-nesterov-clip": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                          dict(max_grad_norm=MAX_NORM), MAX_NORM),
    # torch has no Lion: lion-pytorch's, on the same mesh, is the peer
    "lion-clip": ("Lion", dict(lr=1e-3, weight_decay=0.1), dict(max_grad_norm=MAX_NORM), MAX_NORM),
}
ON_FOUR_RANKS = ("adamw", "sgd-nesterov-clip")


# ----------------------------------------------------------------------------------------------------------------
# the model, the data and the loop, the same in every process


def make_model(dtype: torch.dtype = torch.float32, hidden: int = HIDDEN) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, OUT))
    return model.to(dtype)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, FEATURES, generator=generator), torch.randn(ROWS, OUT, generator=generator)


def fsdp(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_optimizer(name: str, params, ours: bool):
    cls, kwargs, our_kwargs, _ = OPTIMIZERS[name]
    if ours:
        return getattr(fused_optim, cls)(params, **kwargs, **our_kwargs)
    if cls == "Lion":
        import lion_pytorch

        return lion_pytorch.Lion(params, **kwargs)
    return getattr(torch.optim, cls)(params, **kwargs)


def backward(model, step: int, dp_rank: int = 0, dp_size: int = 1, scaler=None) -> None:
    x, y = batch(step)
    p = next(model.parameters())
    x, y = (t.chunk(dp_size)[dp_rank].to(device=p.device, dtype=p.dtype) for t in (x, y))
    loss = F.mse_loss(model(x), y)
    (scaler.scale(loss) if scaler is not None else loss).backward()


def train(model, opt, steps=STEPS, dp_rank=0, dp_size=1, clip=None, first_step=0) -> None:
    for step in range(first_step, first_step + steps):
        backward(model, step, dp_rank, dp_size)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def full_params(model) -> list[torch.Tensor]:
    return [full(p) for p in model.parameters()]


def state_like_params(opt) -> bool:
    """Whether every state tensor but the step count (and int8 moments' scales: the local shard's blocks) is a
    DTensor with its param's mesh and placements."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state[p].items():
                if key not in ("step", "moment_scales") and not (isinstance(value, DTensor) and value.device_mesh == p.device_mesh
                                          and value.placements == p.placements):
                    return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# scenarios: each returns what the tests compare (on every rank)


def fsdp_optimizers(rank: int, world: int, names) -> dict:
    results = {}
    for name in names:
        clip = OPTIMIZERS[name][3]
        ours_model, torch_model = fsdp(make_model()), fsdp(make_model())
        ours = make_optimizer(name, ours_model.parameters(), True)
        theirs = make_optimizer(name, torch_model.parameters(), False)
        train(ours_model, ours, dp_rank=rank, dp_size=world)
        train(torch_model, theirs, dp_rank=rank, dp_size=world, clip=clip)
        results[name] = {"ours": full_params(ours_model), "torch": full_params(torch_model),
                         "state_like_params": state_like_params(ours), "state_keys": sorted(ours.state[
                             next(ours_model.parameters())]), "torch_state_keys": sorted(theirs.state[
                                 next(torch_model.parameters())])}
    return results


def fsdp_low_precision(rank: int, world: int) -> dict:
    """bf16 params under FSDP2: master weights (int16 remainders, a DTensor state), stochastic rounding, and bf16
    moments (each rank rounds its shards with its own random streams)."""
    results = {}
    modes = {"master_weights": dict(master_weights=True), "stochastic_rounding": dict(stochastic_rounding=True),
             "bf16_moments": dict(master_weights=True, moments="bf16"),
             "int8_moments": dict(master_weights=24, moments="int8"),
             "lion_int8_moments": dict(master_weights=24, moments="int8"),
             "sgd_master_weights": dict(momentum=0.9, master_weights=True),
             "sgd_int8_moments": dict(momentum=0.9, master_weights=24, moments="int8")}
    for mode, options in modes.items():
        model = fsdp(make_model(torch.bfloat16))
        cls = {"lion": fused_optim.Lion, "sgd": fused_optim.SGD}.get(mode.split("_")[0], fused_optim.AdamW)
        opt = cls(model.parameters(), lr=1e-2, **options)
        train(model, opt, dp_rank=rank, dp_size=world)
        results[mode] = {"params": full_params(model), "state_like_params": state_like_params(opt)}
        if mode.endswith("int8_moments"):  # each shard's scales: one per 64 of its own elements, a row per moment
            rows = 2 if cls is fused_optim.AdamW else 1  # AdamW's exp_avg and exp_avg_sq; Lion's or SGD's one
            results[mode]["scales_of_shards"] = all(
                tuple(opt.state[p]["moment_scales"].shape) == (rows, -(-p.to_local().numel() // 64))
                for p in model.parameters())
        if mode.endswith("master_weights"):
            # each bf16 param's master: torch_state_dict() joins each shard with its int16 remainder shard (gloo
            # and NCCL gather no int16)
            saved = opt.torch_state_dict()
            masters = [full(saved["state"][i]["master_param"]) for i in range(len(saved["state"]))]
            results[mode]["masters"] = masters
            # loaded back: each fp32 master shard is split into its bf16 param shard and remainder shard
            reloaded = fsdp(make_model(torch.bfloat16))
            reloaded_opt = cls(reloaded.parameters(), lr=1e-2, **options)
            reloaded_opt.load_state_dict(saved)
            state = reloaded_opt.torch_state_dict()["state"]
            results[mode]["reloaded"] = (
                all(torch.equal(full(state[i]["master_param"]), master) for i, master in enumerate(masters))
                and all(torch.equal(p, q) for p, q in zip(full_params(reloaded), results[mode]["params"]))
                and all(isinstance(reloaded_opt.state[p]["master_remainder"], DTensor) for p in reloaded.parameters()))
    return results


def fsdp_grad_scaler(rank: int, world: int) -> dict:
    """fused_optim.GradScaler: the step's inf check is global, so an inf on one rank backs off every rank."""
    model = fsdp(make_model())
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM)
    scaler = fused_optim.GradScaler("cpu", init_scale=2.0**10)
    scales = []
    for step in range(STEPS + 1):
        backward(model, step, rank, world, scaler)
        if step == 1 and rank == world - 1:  # an inf in one rank's shard of one grad
            next(p for p in model.parameters() if p.grad.to_local().numel()).grad.to_local().view(-1)[0] = math.inf
        before = full_params(model)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
        if step == 1:
            skipped_unchanged = all(torch.equal(a, b) for a, b in zip(before, full_params(model)))
    return {"params": full_params(model), "scales": scales, "skipped_unchanged": skipped_unchanged,
            "skipped_steps": float(opt.skipped_steps)}


def fsdp_skip_on_inf(rank: int, world: int) -> dict:
    """max_grad_norm: a NaN in one rank's grad skips the step on every rank, state and step counts included."""
    model = fsdp(make_model())
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    train(model, opt, steps=1, dp_rank=rank, dp_size=world)
    backward(model, 1, rank, world)
    if rank == 0:
        next(iter(model.parameters())).grad.to_local().view(-1)[-1] = math.nan
    before = full_params(model)
    moments = [full(opt.state[p]["exp_avg"]) for p in model.parameters()]
    opt.step()
    return {"params_unchanged": all(torch.equal(a, b) for a, b in zip(before, full_params(model))),
            "moments_unchanged": all(torch.equal(a, full(opt.state[p]["exp_avg"]))
                                     for a, p in zip(moments, model.parameters())),
            "steps": [float(opt.state[p]["step"]) for p in model.parameters()],
            "skipped_steps": float(opt.skipped_steps), "norm_is_nan": bool(opt.last_grad_norm.isnan())}


def fsdp_norms(rank: int, world: int) -> dict:
    """total_norm and clip_grad_norm_ on FSDP2's sharded grads, beside torch's clip_grad_norm_."""
    ours_model, torch_model = fsdp(make_model()), fsdp(make_model())
    backward(ours_model, 0, rank, world)
    backward(torch_model, 0, rank, world)
    grads = [p.grad for p in ours_model.parameters()]
    norms = {}
    for p in NORM_TYPES:
        result = total_norm(grads, p)
        norms[p] = (float(result.full_tensor()), isinstance(result, DTensor) and result.placements == (Replicate(),))
    with CountCollectives() as collectives:
        ours = fused_optim.clip_grad_norm_(ours_model.parameters(), MAX_NORM)
    theirs = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), MAX_NORM)
    # fp64 params: max_grad_norm against torch's clip_grad_norm_ and AdamW on the same mesh (the norm, the clip factor
    # and the unscale in fp64); a norm over two root meshes is fp64 where either holds fp64 grads, in either order
    wide_ours, wide_torch = fsdp(make_model(torch.float64)), fsdp(make_model(torch.float64))
    wide_opt = fused_optim.AdamW(wide_ours.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM)
    train(wide_ours, wide_opt, dp_rank=rank, dp_size=world)
    train(wide_torch, torch.optim.AdamW(wide_torch.parameters(), lr=1e-2, weight_decay=0.1), dp_rank=rank,
          dp_size=world, clip=MAX_NORM)
    other_root = init_device_mesh("cpu", (world,), mesh_dim_names=("other",))
    fp64 = distribute_tensor(torch.randn(6, dtype=torch.float64), other_root, [Shard(0)])
    return {"norms": norms, "clip_ours": (type(ours).__name__, ours.placements, float(ours.full_tensor())),
            "fp64_clipped": (full_params(wide_ours), full_params(wide_torch), wide_opt.last_grad_norm.dtype),
            "two_roots_dtypes": [total_norm(pair, 2.0).dtype for pair in ([grads[0], fp64], [fp64, grads[0]])],
            "clip_torch": (type(theirs).__name__, theirs.placements, float(theirs.full_tensor())),
            "clip_collectives": collectives.count,
            "clipped_ours": [full(p.grad) for p in ours_model.parameters()],
            "clipped_torch": [full(p.grad) for p in torch_model.parameters()]}


def steps_counting_collectives(model, opt, dp_rank: int) -> list[int]:
    """Runs STEPS steps on the 2 x 2 mesh's data and returns how many collectives each `opt.step()` issued."""
    counts = []
    for step in range(STEPS):
        backward(model, step, dp_rank, 2)
        with CountCollectives() as collectives:
            opt.step()
        opt.zero_grad()
        counts.append(collectives.count)
    return counts


def two_d_mesh(rank: int, world: int) -> dict:
    """FSDP x TP on a 2 x 2 mesh: column- then row-parallel Linears (the second's bias replicated over tp), each
    sharded over dp by FSDP2. Every param is a DTensor on the 2-D mesh; the norm counts the replicated bias once."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh.get_local_rank("dp")

    def parallel_model():
        model = make_model(hidden=TP_HIDDEN)
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return fsdp(model, mesh["dp"])

    results = {}
    for name in ("adamw-clip", "sgd-nesterov-clip"):
        ours_model, torch_model = parallel_model(), parallel_model()
        ours = make_optimizer(name, ours_model.parameters(), True)
        theirs = make_optimizer(name, torch_model.parameters(), False)
        step_collectives = steps_counting_collectives(ours_model, ours, dp_rank)
        train(torch_model, theirs, dp_rank=dp_rank, dp_size=2, clip=MAX_NORM)
        results[name] = {"ours": full_params(ours_model), "torch": full_params(torch_model),
                         "state_like_params": state_like_params(ours), "step_collectives": step_collectives,
                         "placements": [tuple(map(str, p.placements)) for p in ours_model.parameters()]}
    # Layer 0 tensor-parallel (its output gathered), layer 2 left to FSDP2 alone: its params are on the dp submesh,
    # in one group with the 2-D ones, as torch's optimizers take them. The norm still takes one collective.
    model = make_model(hidden=TP_HIDDEN)
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(output_layouts=Replicate())})
    model = fsdp(model, mesh["dp"])
    opt = make_optimizer("adamw-clip", model.parameters(), True)
    step_collectives = steps_counting_collectives(model, opt, dp_rank)
    results["two meshes"] = {"ours": full_params(model), "step_collectives": step_collectives,
                             "meshes": [p.device_mesh.ndim for p in model.parameters()]}
    model = parallel_model()
    backward(model, 0, dp_rank, 2)
    results["norms"] = {p: float(total_norm([q.grad for q in model.parameters()], p).full_tensor())
                        for p in NORM_TYPES}
    return results


REPLICA_MODES = {"int8 moments": (torch.float32, dict(moments="int8")), "bf16 moments": (torch.float32, dict(
    moments="bf16")), "bf16 stochastic rounding": (torch.bfloat16, dict(stochastic_rounding=True))}


def shard_coordinates(p: DTensor) -> tuple[int, ...]:
    """The rank's coordinates along the mesh dims that shard `p` (its replicas share them)."""
    return tuple(c for c, placement in zip(p.device_mesh.get_coordinate(), p.placements)
                 if not placement.is_replicate())


def replicas(rank: int, world: int) -> dict:
    """The modes that round stochastically, on a 2 x 2 mesh whose params have replicas: HSDP (Replicate, Shard(0))
    and the tensor-parallel model's row-parallel bias (replicated over tp). Each rank seeds torch differently (as
    scripts do for dropout); replicas of a shard must still round alike, and stay equal. Returns, per mode, each
    param's local shard and its coordinates along the mesh dims that shard it."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    results = {}
    for mode, (dtype, options) in REPLICA_MODES.items():
        for layout in ("hsdp", "tp"):
            model = make_model(dtype, hidden=TP_HIDDEN)
            if layout == "tp":
                parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
                model, dp_rank, dp_size = fsdp(model, mesh["dp"]), mesh.get_local_rank("dp"), 2
            else:
                model, dp_rank, dp_size = fsdp(model, mesh), rank, world
            torch.manual_seed(1000 + rank)
            train(model, fused_optim.AdamW(model.parameters(), lr=1e-2, **options), dp_rank=dp_rank, dp_size=dp_size)
            results[mode, layout] = [(p.to_local().detach().clone(), shard_coordinates(p)) for p in model.parameters()]
    return results


def checkpoint_save(rank: int, world: int, path: str) -> dict:
    """Two steps, a DCP checkpoint of model and optimizer, then two more steps: the uninterrupted run."""
    model = fsdp(make_model())
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world, first_step=2)
    return {"uninterrupted": full_params(model)}


def load_checkpoint(model, opt, path: str) -> None:
    """The README's load of a DCP checkpoint into model and optimizer, whatever their sharding: get_state_dict,
    dcp.load, set_state_dict (inside the optimizer's torch_layout(), the one-step load of torch's form)."""
    state = dict(zip(("model", "optim"), get_state_dict(model, opt)))
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resume(model, opt, path: str, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """Loads the checkpoint into model and optimizer (whatever their sharding) and runs the last two steps."""
    load_checkpoint(model, opt, path)
    train(model, opt, steps=2, dp_rank=dp_rank, dp_size=dp_size, first_step=2)
    return full_params(model)


def checkpoint_load(rank: int, world: int, path: str) -> dict:
    model = fsdp(make_model())
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    return {"resumed": resume(model, opt, path, rank, world), "state_like_params": state_like_params(opt)}


def int8_checkpoint(rank: int, world: int, path: str) -> dict:
    """AdamW with int8 moments: a DCP checkpoint after two steps, loaded on the same two ranks into a fresh model and
    optimizer. Each rank's block scales are its own shard's: the checkpoint must keep every rank's."""
    def fresh():
        model = fsdp(make_model())
        return model, fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, moments="int8")

    model, opt = fresh()
    train(model, opt, steps=2, dp_rank=rank, dp_size=world)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world, first_step=2)
    resumed_model, resumed_opt = fresh()
    # the same ranks, a weight sharded along its other dim: as many blocks a shard, of other elements
    def square(placement):
        torch.manual_seed(0)
        layer = fully_shard(torch.nn.Linear(8, 8, bias=False), shard_placement_fn=lambda p: placement)
        return layer, fused_optim.AdamW(layer.parameters(), lr=1e-2, moments="int8")

    rows, rows_opt = square(Shard(0))
    rows(torch.randn(2, 8)).square().sum().backward()
    rows_opt.step()
    dcp.save(dict(zip(("model", "optim"), get_state_dict(rows, rows_opt))), checkpoint_id=path + "-rows")
    columns, columns_opt = square(Shard(1))
    try:
        load_checkpoint(columns, columns_opt, path + "-rows")
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return {"uninterrupted": full_params(model), "resumed": resume(resumed_model, resumed_opt, path, rank, world),
            "other_placements": refusal}


def torch_checkpoint(rank: int, world: int, path: str) -> dict:
    """A DCP checkpoint of torch's AdamW loaded into ours with the README's recipe (get_state_dict, dcp.load,
    set_state_dict): DCP asks for every key of our dict, so our groups must hold no key torch's lack."""
    def fresh(cls):
        model = fsdp(make_model())
        return model, cls(model.parameters(), lr=1e-2, weight_decay=0.1)

    model, opt = fresh(torch.optim.AdamW)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world, first_step=2)
    resumed_model, resumed_opt = fresh(fused_optim.AdamW)
    return {"uninterrupted": full_params(model), "resumed": resume(resumed_model, resumed_opt, path, rank, world)}


def int8_moments_in_torch_layout(opt) -> list[torch.Tensor]:
    """Every param's moments in fp32 (torch_state_dict), whole (a collective: every rank calls it)."""
    state = opt.torch_state_dict()["state"]
    return [full(state[i][key]) for i in sorted(state) for key in ("exp_avg", "exp_avg_sq")]


def fresh_int8_adamw(**options):
    model = fsdp(make_model())
    return model, fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **options)


def int8_checkpoint_in_torch_layout(rank: int, world: int, path: str) -> dict:
    """AdamW with int8 moments saved in torch's form (torch_layout()), which any sharding loads: the checkpoint
    after two steps, then two more steps."""
    model, opt = fresh_int8_adamw(moments="int8")
    train(model, opt, steps=2, dp_rank=rank, dp_size=world)
    with opt.torch_layout():
        model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    saved = int8_moments_in_torch_layout(opt)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world, first_step=2)
    return {"uninterrupted": full_params(model), "saved": saved}


def int8_checkpoint_resharded(rank: int, world: int, path: str) -> dict:
    """int8_checkpoint_in_torch_layout's checkpoint (four ranks) loaded on two, then the last two steps."""
    model, opt = fresh_int8_adamw(moments="int8")
    with opt.torch_layout():
        load_checkpoint(model, opt, path)
    loaded = int8_moments_in_torch_layout(opt)
    train(model, opt, steps=2, dp_rank=rank, dp_size=world, first_step=2)
    return {"resumed": full_params(model), "loaded": loaded}


def torch_checkpoint_into_int8(rank: int, world: int, path: str) -> dict:
    """torch_checkpoint's checkpoint (of torch's AdamW) into int8 moments in one step (inside torch_layout()), and in
    the two the README gave before: into fp32 moments, then load_state_dict. Each rank's state tensors."""
    model, opt = fresh_int8_adamw(moments="int8")
    with opt.torch_layout():
        load_checkpoint(model, opt, path)
    fp32_model, fp32_opt = fresh_int8_adamw()
    resume_model, resume_opt = fresh_int8_adamw(moments="int8")
    load_checkpoint(fp32_model, fp32_opt, path)
    resume_opt.load_state_dict(fp32_opt.state_dict())

    def local_state(optimizer):
        return [value.to_local() if isinstance(value, DTensor) else value
                for p in optimizer.param_groups[0]["params"] for value in optimizer.state[p].values()]

    return {"one_step": local_state(opt), "two_steps": local_state(resume_opt)}


def zero_redundancy(rank: int, world: int) -> dict:
    """ZeroRedundancyOptimizer over fused_optim.AdamW on a DDP model; its consolidated state_dict on rank 0."""
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fused_optim.AdamW, lr=1e-2, weight_decay=0.1)
    train(model, opt, dp_rank=rank, dp_size=world)
    opt.consolidate_state_dict(to=0)
    # clipping by the global norm: each rank's AdamW holds its partition, and sums the squares over ZeRO's group,
    # which it finds without being told
    clipped = torch.nn.parallel.DistributedDataParallel(make_model())
    clipped_opt = ZeroRedundancyOptimizer(clipped.parameters(), optimizer_class=fused_optim.AdamW, lr=1e-2,
                                          weight_decay=0.1, max_grad_norm=MAX_NORM)
    train(clipped, clipped_opt, dp_rank=rank, dp_size=world)
    return {"params": full_params(model.module), "state_dict": opt.state_dict() if rank == 0 else None,
            "clipped": full_params(clipped.module),
            "partition_sizes": len(clipped_opt.optim.param_groups[0]["params"]),
            "grad_norm_group_is_zeros": clipped_opt.optim.grad_norm_group is clipped_opt.process_group,
            "unclipped_group": opt.optim.grad_norm_group}


# GradAccumulator: (counted, ignored) target tokens of each micro-batch, per rank; the same number of micro-batches
# on each rank (FSDP2 all-gathers in every forward), different token counts.
RANK_MICRO_BATCHES = [[(1, 2), (9, 0), (30, 5)], [(4, 1), (17, 3), (6, 6)]]


def accumulator(rank: int, world: int) -> dict:
    """FSDP2 with sync off for all micro-batches but the last, fp32 sharded main grads, the token count
    all-reduced, clipping in finalize; then one AdamW step from the main grads."""
    model = fsdp(classifier())  # FSDP2's default: gradients averaged over the ranks, which finalize() undoes
    acc = fused_optim.GradAccumulator(model.parameters())
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2)
    mine = rank_micro_batches(RANK_MICRO_BATCHES)[rank]
    tokens = torch.zeros((), dtype=torch.int64)
    for i, (x, y) in enumerate(mine):
        model.set_requires_gradient_sync(i == len(mine) - 1)
        F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum").backward()
        acc.accumulate()
        tokens += fused_optim.count_tokens(y, IGNORE)
    norm = acc.finalize(num_tokens=tokens, max_norm=MAX_NORM)
    main_grads = [p.main_grad for p in model.parameters()]
    result = {"grads": [full(g) for g in main_grads], "norm": float(norm),
              "main_grads_sharded": all(isinstance(g, DTensor) and g.placements == p.placements
                                        for g, p in zip(main_grads, model.parameters()))}
    opt.step()
    result["params"] = full_params(model)
    return result


def bad_inputs(rank: int, world: int) -> dict:
    """Each bad input's exception type and message; and that a refused step changed nothing."""
    mesh = init_device_mesh("cpu", (world,))
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]))
    errors = {}

    def record(name, fn):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError) as error:
            errors[name] = (type(error).__name__, str(error))

    record("mixed group", lambda: fused_optim.AdamW([sharded, torch.nn.Parameter(torch.randn(3))]))
    record("gradient release", lambda: fused_optim.AdamW([sharded], gradient_release=True))
    release_hooks = len(sharded._post_accumulate_grad_hooks or {})
    opt = fused_optim.AdamW([sharded], lr=0.1)
    sharded.grad = distribute_tensor(torch.ones(6, 3), mesh, [Shard(0)])
    opt.step()
    before, step_before = full(sharded), float(opt.state[sharded]["step"])
    sharded.grad = distribute_tensor(torch.ones(6, 3), mesh, [Replicate()])
    record("grad placements", opt.step)
    unchanged = torch.equal(before, full(sharded)) and float(opt.state[sharded]["step"]) == step_before
    other_mesh = init_device_mesh("cpu", (1, world))
    for name, exp_avg in (("plain", torch.zeros(6, 3)),
                          ("another mesh", distribute_tensor(torch.zeros(6, 3), other_mesh, [Replicate(), Shard(0)]))):
        saved = opt.state_dict()
        saved["state"][0]["exp_avg"] = exp_avg
        record(f"load {name} state", lambda saved=saved: opt.load_state_dict(saved))
    unchanged = unchanged and torch.equal(before, full(sharded)) and float(opt.state[sharded]["step"]) == step_before
    plain = torch.zeros(6, 3)
    record("op with a mixed list", lambda: adam_step(
        [sharded], [plain], [plain], [plain], [], [], [torch.zeros(())], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False, maximize=False))
    like = [distribute_tensor(torch.zeros(6, 3), mesh, [Shard(0)]) for _ in range(3)]
    replicated = distribute_tensor(torch.zeros(6, 3), mesh, [Replicate()])
    for index, name in enumerate(("grads", "exp_avgs", "exp_avg_sqs")):  # one list of another layout at a time
        lists = [replicated if i == index else t for i, t in enumerate(like)]
        record(f"op with {name} of another layout", lambda lists=lists: adam_step(
            [sharded], [lists[0]], [lists[1]], [lists[2]], [], [], [torch.zeros(())], lr=0.1, beta1=0.9, beta2=0.99,
            eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True, amsgrad=False, maximize=False))
    return {"errors": errors, "unchanged": unchanged, "release_hooks": release_hooks}


def on_four_ranks(rank: int, world: int, path: str) -> dict:
    return {"fsdp": fsdp_optimizers(rank, world, ON_FOUR_RANKS), "two_d": two_d_mesh(rank, world),
            "checkpoint": checkpoint_save(rank, world, path), "replicas": replicas(rank, world),
            "int8_torch_layout": int8_checkpoint_in_torch_layout(rank, world, os.path.join(path, "int8-torch"))}


def on_two_ranks(rank: int, world: int, path: str) -> dict:
    return {"fsdp": fsdp_optimizers(rank, world, OPTIMIZERS), "low_precision": fsdp_low_precision(rank, world),
            "scaler": fsdp_grad_scaler(rank, world), "skip": fsdp_skip_on_inf(rank, world),
            "norms": fsdp_norms(rank, world), "checkpoint": checkpoint_load(rank, world, path),
            "int8_checkpoint": int8_checkpoint(rank, world, os.path.join(path, "int8")),
            "torch_checkpoint": torch_checkpoint(rank, world, os.path.join(path, "torch")),
            "torch_checkpoint_into_int8": torch_checkpoint_into_int8(rank, world, os.path.join(path, "torch")),
            "int8_resharded": int8_checkpoint_resharded(rank, world, os.path.join(path, "int8-torch")),
            "zero": zero_redundancy(rank, world), "accumulator": accumulator(rank, world),
            "bad": bad_inputs(rank, world)}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("dcp"))


@pytest.fixture(scope="module")
def four(tmp_path_factory, checkpoint_dir) -> list[dict]:
    return run_workers(functools.partial(on_four_ranks, path=checkpoint_dir), 4, str(tmp_path_factory.mktemp("w4")))


@pytest.fixture(scope="module")
def two(tmp_path_factory, checkpoint_dir, four) -> list[dict]:  # after `four`: it loads that run's checkpoint
    return run_workers(functools.partial(on_two_ranks, path=checkpoint_dir), 2, str(tmp_path_factory.mktemp("w2")))


# ----------------------------------------------------------------------------------------------------------------
# the single-process runs the distributed ones must equal


@functools.cache
def single_process(name: str, hidden: int = HIDDEN) -> list[torch.Tensor]:
    model = make_model(hidden=hidden)
    train(model, make_optimizer(name, model.parameters(), True))
    return full_params(model)


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert float((a.double() - b.double()).abs().max()) <= atol, float((a - b).abs().max())


def assert_same_on_every_rank(results: list, pick) -> None:
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(pick(results[0]), pick(result)))


# ----------------------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("layout", ["hsdp", "tp"])
@pytest.mark.parametrize("mode", REPLICA_MODES)
def test_replicas_round_alike_and_stay_equal(four, mode, layout):
    params = len(four[0]["replicas"][mode, layout])
    replicated = 0
    for index in range(params):
        by_shard: dict[tuple, list[torch.Tensor]] = {}
        for result in four:
            local, shard = result["replicas"][mode, layout][index]
            by_shard.setdefault(shard, []).append(local)
        for locals_of_a_shard in by_shard.values():
            replicated += len(locals_of_a_shard) > 1
            assert all(torch.equal(locals_of_a_shard[0], local) for local in locals_of_a_shard[1:])
        assert len(by_shard) > 1  # sharded over some dim: the shards themselves drew differently
    assert replicated > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_two_ranks_equals_torch_on_the_mesh_and_the_single_process(two, name):
    for result in two:
        run = result["fsdp"][name]
        assert_close(run["ours"], run["torch"])
        assert_close(run["ours"], single_process(name))
        assert run["state_like_params"]
        # torch's state keys (SGD adds its documented step count): DCP and resharding see what they see with torch's
        assert set(run["torch_state_keys"]) <= set(run["state_keys"])
    assert_same_on_every_rank(two, lambda r: r["fsdp"][name]["ours"])


@pytest.mark.parametrize("name", ON_FOUR_RANKS)
def test_fsdp2_four_ranks_with_an_empty_shard(four, name):
    for result in four:
        run = result["fsdp"][name]
        assert_close(run["ours"], run["torch"])
        assert_close(run["ours"], single_process(name))
        assert run["state_like_params"]


@pytest.mark.parametrize("name", ("adamw-clip", "sgd-nesterov-clip"))
def test_two_d_fsdp_by_tensor_parallel_mesh(four, name):
    for result in four:
        run = result["two_d"][name]
        assert ("S(0)", "R") in run["placements"]  # the row-parallel bias: replicated over tp
        assert_close(run["ours"], run["torch"])
        assert_close(run["ours"], single_process(name, TP_HIDDEN))
        assert run["state_like_params"]
        assert run["step_collectives"] == [1] * STEPS  # the global norm: one all-reduce over the 2-D mesh


def test_a_group_on_a_2d_mesh_and_its_submesh(four):
    for result in four:
        run = result["two_d"]["two meshes"]
        assert run["meshes"] == [2, 2, 1, 1]  # layer 0 on the 2-D mesh, layer 2 on the dp submesh
        assert_close(run["ours"], single_process("adamw-clip", TP_HIDDEN))
        assert run["step_collectives"] == [1] * STEPS  # one all-reduce over the root mesh


def reference_norms(model_fn, backward_fn) -> dict[float, float]:
    model = model_fn()
    backward_fn(model)
    grads = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    return {p: float(torch.linalg.vector_norm(grads, p)) for p in NORM_TYPES}


def test_two_d_norms_count_replicas_once(four):
    want = reference_norms(functools.partial(make_model, hidden=TP_HIDDEN), lambda m: backward(m, 0))
    for result in four:
        for p, value in result["two_d"]["norms"].items():
            assert value == pytest.approx(want[p], rel=1e-6)


def test_total_norm_and_clip_grad_norm_on_fsdp2_grads(two):
    want = reference_norms(make_model, lambda m: backward(m, 0))
    for result in two:
        run = result["norms"]
        for p, (value, replicated) in run["norms"].items():
            assert value == pytest.approx(want[p], rel=1e-6)
            assert replicated  # a DTensor replicated on the mesh, as torch's
        kind, placements, value = run["clip_ours"]
        assert (kind, placements) == run["clip_torch"][:2]
        assert value == pytest.approx(run["clip_torch"][2], rel=1e-6)
        assert value == pytest.approx(want[2.0], rel=1e-6)
        assert_close(run["clipped_ours"], run["clipped_torch"], atol=1e-8)
        assert run["clip_collectives"] == 1
        ours, theirs, norm_dtype = run["fp64_clipped"]
        assert norm_dtype == torch.float64
        assert_close(ours, theirs, atol=1e-13)
        assert run["two_roots_dtypes"] == [torch.float64, torch.float64]


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(two):
    for result in two:
        run = result["skip"]
        assert run["params_unchanged"] and run["moments_unchanged"] and run["norm_is_nan"]
        assert run["steps"] == [1.0] * 4 and run["skipped_steps"] == 1.0


def test_grad_scaler_backs_off_on_every_rank(two):
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM)
    for step in (0, 2, 3):  # the single process takes the steps the ranks did not skip
        backward(model, step)
        opt.step()
        opt.zero_grad()
    for result in two:
        run = result["scaler"]
        assert run["skipped_unchanged"] and run["skipped_steps"] == 1.0
        assert run["scales"][1] == 2.0**9  # backed off after the inf step, on every rank
        assert_close(run["params"], full_params(model))


def test_master_weights_and_stochastic_rounding_on_bf16_shards(two):
    model = make_model(torch.bfloat16)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, master_weights=True)
    train(model, opt)
    masters = [master_weight(opt, p) for p in model.parameters()]
    lion_model = make_model(torch.bfloat16)
    lion = fused_optim.Lion(lion_model.parameters(), lr=1e-2, master_weights=True)
    train(lion_model, lion)
    lion_masters = torch.cat([master_weight(lion, p).flatten() for p in lion_model.parameters()])
    sgd_model = make_model(torch.bfloat16)
    sgd = fused_optim.SGD(sgd_model.parameters(), lr=1e-2, momentum=0.9, master_weights=True)
    train(sgd_model, sgd)
    sgd_masters = [master_weight(sgd, p) for p in sgd_model.parameters()]
    for result in two:
        run = result["low_precision"]
        assert all(run[mode]["state_like_params"] for mode in run)
        assert all(run[mode]["scales_of_shards"] for mode in ("int8_moments", "lion_int8_moments", "sgd_int8_moments"))
        # the ranks' bf16 gradients are averaged in another order than the single process sums them: a few ulps
        assert_close(run["master_weights"]["masters"], masters, atol=2e-3)
        assert run["master_weights"]["reloaded"] and run["sgd_master_weights"]["reloaded"]
        assert_close(run["sgd_master_weights"]["masters"], sgd_masters, atol=2e-3)
        for got, want in zip(run["sgd_int8_moments"]["params"], sgd_masters):
            assert float((got.float() - want).abs().max()) <= 2e-2  # a few bf16 ulps of the fp32 path
        for mode in ("stochastic_rounding", "bf16_moments", "int8_moments"):
            for got, want in zip(run[mode]["params"], masters):
                assert float((got.float() - want).abs().max()) <= 2e-2, mode  # a few bf16 ulps of the fp32 path
        # Lion with int8 moments on shards against one process's Lion with fp32 ones: each element moves by the lr
        # (1e-2) a step, the same way but where the direction is within the codes' rounding of 0 (a step the other
        # way is 2e-2 off); the bf16 params are within half an ulp of the masters
        got = torch.cat([p.float().flatten() for p in run["lion_int8_moments"]["params"]])
        assert ((got - lion_masters).abs() <= 5e-3).float().mean() > 0.99


def test_distributed_checkpoint_resharded_from_four_ranks_to_two_and_to_one(four, two, checkpoint_dir):
    uninterrupted = four[0]["checkpoint"]["uninterrupted"]
    for result in two:
        assert result["checkpoint"]["state_like_params"]
        assert_close(result["checkpoint"]["resumed"], uninterrupted)
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    assert_close(resume(model, opt, checkpoint_dir, 0, 1), uninterrupted)  # into one process, no process group


def test_a_distributed_checkpoint_of_torchs_adamw_resumes_in_ours(two):
    for result in two:
        run = result["torch_checkpoint"]
        assert_close(run["resumed"], run["uninterrupted"])


def test_distributed_checkpoint_of_int8_moments_keeps_each_ranks_scales(two, checkpoint_dir):
    for result in two:
        run = result["int8_checkpoint"]
        assert all(torch.equal(a, b) for a, b in zip(run["resumed"], run["uninterrupted"]))
        # as many blocks a shard on another sharding (the same ranks, the weights sharded by columns): refused in one
        # sentence, not misread
        assert "saved from another sharding" in run["other_placements"] and "torch_layout()" in run["other_placements"]
    # on another sharding the saved scales cannot serve (their blocks are the old shards'): refused, not misread
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, moments="int8")
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match="(?s)Size mismatch .*moment_scales"):
        resume(model, opt, os.path.join(checkpoint_dir, "int8"), 0, 1)


def test_a_checkpoint_of_torchs_adamw_loads_into_int8_moments_in_one_step(two):
    """With the dict DCP fills got inside torch_layout(), the state is the two-step recipe's, bit for bit."""
    for result in two:
        run = result["torch_checkpoint_into_int8"]
        assert len(run["one_step"]) == len(run["two_steps"]) > 0
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(run["one_step"], run["two_steps"]))
        assert any(a.dtype == torch.uint8 for a in run["one_step"])  # exp_avg_sq's codes: int8 moments indeed


def test_an_int8_checkpoint_in_torch_layout_reshards_from_four_ranks_to_two(four, two):
    """Saved in torch's form on four ranks and loaded on two, int8 moments keep their values up to requantizing
    them in the new shards' blocks (measured: 0.7 % of a moment's largest), and the run goes on as the
    uninterrupted one, but for those codes: 4e-4 apart after two steps of lr 1e-2 (moments loaded as zeros, say,
    would be 1.5e-2 off)."""
    saved = four[0]["int8_torch_layout"]["saved"]
    uninterrupted = four[0]["int8_torch_layout"]["uninterrupted"]
    for result in two:
        run = result["int8_resharded"]
        for got, want in zip(run["loaded"], saved):
            # a code step (stochastic rounding moves up to one): at most 2/127 of the block's scale for exp_avg, 4/255
            # for exp_avg_sq, and a block's scale is at most the moment's largest
            assert (got - want).abs().max() <= 2 / 127 * want.abs().max()
        for got, want in zip(run["resumed"], uninterrupted):
            assert torch.isfinite(got).all() and (got - want).abs().max() <= 2e-3


def test_a_checkpoint_of_torchs_adamw_loads_into_master_weights_in_one_step(tmp_path):
    """bf16 params: torch's AdamW keeps no master weights, so the dict DCP fills is got inside
    torch_layout(master_weights=False); each master then starts from its param as loaded. The state is the two-step
    recipe's (into fp32 moments without masters, then load_state_dict), bit for bit. One process, no process
    group."""
    def fresh(cls=fused_optim.AdamW, **options):
        model = make_model(torch.bfloat16)
        return model, cls(model.parameters(), lr=1e-2, weight_decay=0.1, **options)

    model, torch_opt = fresh(torch.optim.AdamW)
    train(model, torch_opt, steps=2)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, torch_opt))), checkpoint_id=str(tmp_path))

    one, one_opt = fresh(master_weights=True, moments="int8")
    with one_opt.torch_layout(master_weights=False):
        load_checkpoint(one, one_opt, str(tmp_path))
    plain, plain_opt = fresh()
    load_checkpoint(plain, plain_opt, str(tmp_path))
    two, two_opt = fresh(master_weights=True, moments="int8")
    two.load_state_dict(plain.state_dict())
    two_opt.load_state_dict(plain_opt.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), model.parameters()))
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q) and torch.equal(master_weight(one_opt, p), p.float())
        for key, value in one_opt.state[p].items():
            assert value.dtype == two_opt.state[q][key].dtype and torch.equal(value, two_opt.state[q][key]), key
    assert "moment_scales" in one_opt.state[next(one.parameters())]


FLATTENED_MODES = {  # the optimizer and its options, each mode's state (bf16 params) saved flattened
    "adamw": (fused_optim.AdamW, {}),
    "adamw-int8-24-bit": (fused_optim.AdamW, dict(moments="int8", master_weights=24)),
    "adam-bf16-stochastic": (fused_optim.Adam, dict(moments="bf16", stochastic_rounding=True)),
    "sgd-int8-masters": (fused_optim.SGD, dict(momentum=0.9, moments="int8", master_weights=True)),
    # its state_dict leaves out the counts that say only "set", which DCP then unflattens as {}
    "sgd-fp32-momentum": (fused_optim.SGD, dict(momentum=0.9)),
    "lion-int8": (fused_optim.Lion, dict(moments="int8")),
}


@pytest.mark.parametrize("mode", FLATTENED_MODES)
def test_a_flattened_checkpoint_resumes_bit_for_bit(tmp_path, mode):
    """DCP's flatten_optimizer_state_dict (torchtitan's) asks the saved groups for every key of the groups it loads
    into: a group holds our options only where not neutral, and saves what it holds. One process."""
    cls, options = FLATTENED_MODES[mode]
    flat = StateDictOptions(flatten_optimizer_state_dict=True)

    def fresh():
        model = make_model(torch.bfloat16)
        return model, cls(model.parameters(), lr=1e-2, weight_decay=0.1, **options)

    model, opt = fresh()
    train(model, opt, steps=2)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, opt, options=flat))), checkpoint_id=str(tmp_path))
    train(model, opt, steps=2, first_step=2)
    resumed, resumed_opt = fresh()
    state = dict(zip(("model", "optim"), get_state_dict(resumed, resumed_opt, options=flat)))
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=flat)
    train(resumed, resumed_opt, steps=2, first_step=2)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), model.parameters()))
    # as state_dicts: an fp32 SGD buffer's count says only that it is set, and a buffer loaded without one counts
    # from 1 (the state_dict leaves such counts out)
    resumed_state, uninterrupted_state = resumed_opt.state_dict()["state"], opt.state_dict()["state"]
    assert resumed_state.keys() == uninterrupted_state.keys()
    for index, saved in uninterrupted_state.items():
        assert resumed_state[index].keys() == saved.keys()
        assert all(torch.equal(resumed_state[index][key], value) for key, value in saved.items())


def test_a_flattened_checkpoint_of_torchs_adamw_resumes_in_ours(tmp_path):
    """A group of torch's settings is torch's key for key: torch's AdamW, saved flattened, loads into ours."""
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model = make_model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, torch_opt, steps=2)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, torch_opt, options=flat))), checkpoint_id=str(tmp_path))
    train(model, torch_opt, steps=2, first_step=2)
    ours = make_model()
    opt = fused_optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1)
    state = dict(zip(("model", "optim"), get_state_dict(ours, opt, options=flat)))
    dcp.load(state, checkpoint_id=str(tmp_path))
    set_state_dict(ours, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=flat)
    assert opt.param_groups[0].keys() == torch_opt.param_groups[0].keys()
    train(ours, opt, steps=2, first_step=2)
    for p, q in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("moments", ["fp32", "int8"])
def test_a_checkpoint_of_torchs_sgd_resumes_in_ours(tmp_path, moments):
    """torch's SGD keeps no step counts, and neither does the dict DCP fills: our state_dict() with fp32 momentum
    (its counts say only "set"), torch_layout() with int8. The run then goes on as torch's (int8: but for its
    codes' rounding). One process, no process group."""
    def fresh(cls, **options):
        model = make_model()
        return model, cls(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1, **options)

    model, torch_opt = fresh(torch.optim.SGD)
    train(model, torch_opt, steps=2)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, torch_opt))), checkpoint_id=str(tmp_path))
    train(model, torch_opt, steps=2, first_step=2)
    ours, opt = fresh(fused_optim.SGD, moments=moments)
    with opt.torch_layout() if moments == "int8" else contextlib.nullcontext():
        load_checkpoint(ours, opt, str(tmp_path))
    train(ours, opt, steps=2, first_step=2)
    if moments == "fp32":
        assert_close(full_params(ours), full_params(model))
    else:
        for got, want in zip(full_params(ours), full_params(model)):
            assert (got - want).abs().max() <= 1e-3


def test_zero_redundancy_optimizer(two):
    name = "adamw"
    for result in two:
        assert_close(result["zero"]["params"], single_process(name))
    # the clipped run is a single process's clipped by the global norm (torch's clip_grad_norm_ then AdamW)
    reference = make_model()
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    train(reference, reference_opt, clip=MAX_NORM)
    for result in two:
        assert 0 < result["zero"]["partition_sizes"] < len(list(reference.parameters()))  # each holds a part
        assert result["zero"]["grad_norm_group_is_zeros"] and result["zero"]["unclipped_group"] is None
        assert_close(result["zero"]["clipped"], full_params(reference))
    state_dict = two[0]["zero"]["state_dict"]
    model = make_model()
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt)
    opt.load_state_dict(state_dict)  # the consolidated state loads into a single-process optimizer
    reference = make_model()
    reference_opt = fused_optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    train(reference, reference_opt)
    for p, q in zip(model.parameters(), reference.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert float((opt.state[p][key] - reference_opt.state[q][key]).abs().max()) <= 1e-6


def test_grad_accumulator_under_fsdp2_equals_the_full_batch(two):
    model = classifier().double()
    data = [batch for rank_data in rank_micro_batches(RANK_MICRO_BATCHES) for batch in rank_data]
    x, y = torch.cat([x for x, _ in data]).double(), torch.cat([y for _, y in data])
    F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
    assert norm > MAX_NORM
    for result in two:
        run = result["accumulator"]
        assert run["main_grads_sharded"]
        assert run["norm"] == pytest.approx(norm, rel=1e-6)
        for got, p in zip(run["grads"], model.parameters()):
            assert float((got.double() - p.grad).norm() / p.grad.norm()) < 1e-6
    assert_same_on_every_rank(two, lambda r: r["accumulator"]["params"])


def test_bad_inputs_get_one_sentence_and_change_nothing(two):
    for result in two:
        errors = result["bad"]["errors"]
        assert errors["mixed group"] == ("ValueError", "AdamW: a group's params must be all DTensors or all plain "
                                                       "tensors, not a mix.")
        assert errors["grad placements"][0] == "RuntimeError" and "mesh and placements" in errors["grad placements"][1]
        assert errors["op with a mixed list"] == ("RuntimeError", "adam_step: the tensors must be all DTensors or "
                                                                  "all plain tensors, not a mix.")
        for name in ("grads", "exp_avgs", "exp_avg_sqs"):
            assert errors[f"op with {name} of another layout"] == (
                "RuntimeError", "adam_step: every DTensor must have the mesh and placements of its param.")
        # on any number of ranks, FSDP2's DTensor params are refused as such (not as a multi-process run), and
        # nothing is left hooked
        assert errors["gradient release"][0] == "ValueError" and "does not take DTensor params" in (
            errors["gradient release"][1])
        assert result["bad"]["release_hooks"] == 0
        assert errors["load plain state"] == ("ValueError", "loaded state dict's 'exp_avg' of param 0 is a plain "
                                              "tensor, but the param is a DTensor on the mesh of ranks [0, 1]: load "
                                              "a state saved on the param's mesh (any placements; "
                                              "torch.distributed.checkpoint reshards one saved on another)")
        assert errors["load another mesh state"][0] == "ValueError" and (
            "is a DTensor on the mesh of ranks [[0, 1]]" in errors["load another mesh state"][1])
        assert result["bad"]["unchanged"]


def test_plain_tensors_take_the_plain_path():
    # no DTensor anywhere: the lists reach the kernels as they are
    from fused_optim.ops import _dtensor

    tensors = [torch.randn(3), torch.randn(2)]
    (local,) = _dtensor.to_local("op", tensors)
    assert all(a is b for a, b in zip(local, tensors))


# ----------------------------------------------------------------------------------------------------------------
# on one GPU (NCCL, a mesh of one rank): the CUDA and Triton kernels through the same DTensor code


def on_one_gpu(rank: int, world: int) -> dict:
    results = {}
    for backend in ("cuda", "triton"):
        model = fsdp(make_model().cuda())
        opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM,
                                backend=backend)
        train(model, opt)
        backward(model, STEPS)
        norm = fused_optim.clip_grad_norm_(model.parameters(), MAX_NORM, backend=backend)
        results[backend] = {"params": [p.cpu() for p in full_params(model)], "norm": float(norm.full_tensor()),
                            "norm_is_dtensor": isinstance(norm, DTensor),
                            "state_like_params": state_like_params(opt)}
        mesh = init_device_mesh("cuda", (1,))
        logits = torch.randn(5, 11, device="cuda", generator=torch.Generator("cuda").manual_seed(3)) * 4
        target = torch.tensor([0, 10, 3, -100, 7], device="cuda")
        sharded = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
        loss = fused_optim.functional.cross_entropy(sharded, target, label_smoothing=0.1, backend=backend)
        loss.backward()
        results[backend]["loss"] = (float(loss.full_tensor()), sharded.grad.full_tensor().cpu(), logits.cpu())
    return results


@pytest.mark.cuda
def test_dtensor_paths_on_one_gpu(tmp_path):
    (result,) = run_workers(on_one_gpu, 1, str(tmp_path), backend="nccl")
    for backend in ("cuda", "triton"):
        model = make_model().cuda()
        opt = fused_optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM,
                                backend=backend)
        train(model, opt)
        backward(model, STEPS)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        run = result[backend]
        assert_close(run["params"], [p.cpu() for p in full_params(model)])
        assert run["norm"] == pytest.approx(float(norm), rel=1e-6) and run["norm_is_dtensor"]
        assert run["state_like_params"]
        loss, grad, logits = run["loss"]
        logits = logits.cuda().requires_grad_()
        want = fused_optim.functional.cross_entropy(logits, torch.tensor([0, 10, 3, -100, 7], device="cuda"),
                                                    label_smoothing=0.1, backend=backend)
        want.backward()
        assert loss == pytest.approx(float(want), rel=2e-6)
        torch.testing.assert_close(grad, logits.grad.cpu(), rtol=1e-6, atol=2e-7)
