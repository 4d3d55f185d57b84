"""A small language model trained with FSDP2 x tensor parallelism and fused_optim: the AdamW step runs on each
rank's shards (clipping with one all-reduce over the whole mesh), the loss reads only this rank's shard of the
vocabulary, and a torch.distributed.checkpoint (DCP) checkpoint of model and optimizer is saved, loaded into a fresh
model, and training goes on.

    torchrun --nproc-per-node 4 examples/distributed.py            # CPU (gloo): a 2 (data) x 2 (tensor) mesh
    torchrun --nproc-per-node 8 examples/distributed.py --device cuda

With an odd number of ranks the mesh is data-parallel only (tensor parallelism over 1 rank).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fused_optim

VOCAB, HIDDEN, SEQ, BATCH = 512, 64, 32, 4


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.up = torch.nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = torch.nn.Linear(4 * HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(torch.nn.functional.gelu(self.up(h)))
        return self.lm_head(h)


def build(mesh) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM().to(mesh.device_type)
    parallelize_module(model, mesh["tp"], {
        "up": ColwiseParallel(), "down": RowwiseParallel(),
        # the logits stay a DTensor sharded on the vocabulary: fused_optim's loss takes them as they are
        "lm_head": ColwiseParallel(use_local_output=False),
    })
    for module in (model.embed, model.up, model.down, model.lm_head, model):
        fully_shard(module, mesh=mesh["dp"])
    opt = fused_optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, max_grad_norm=1.0)
    return model, opt


def train(model, opt, mesh, steps: int, first_step: int = 0) -> float:
    dp_rank = mesh.get_local_rank("dp")
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(1000 * step + dp_rank)  # each data-parallel rank its own batch
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator).to(mesh.device_type)
        logits = model(tokens[:, :-1])  # (BATCH, SEQ, VOCAB), sharded on VOCAB over "tp"
        loss = fused_optim.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach().full_tensor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tp = 2 if world % 2 == 0 else 1
    mesh = init_device_mesh(args.device, (world // tp, tp), mesh_dim_names=("dp", "tp"))

    model, opt = build(mesh)
    loss = train(model, opt, mesh, args.steps)
    if rank == 0:
        print(f"{args.steps} steps on a {world // tp} x {tp} (data x tensor) mesh: loss {loss:.4f}")

    checkpoint = [tempfile.mkdtemp(prefix="fused_optim_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(checkpoint)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint[0])

    resumed, resumed_opt = build(mesh)  # a fresh model and optimizer, loaded from the checkpoint
    model_state, optim_state = get_state_dict(resumed, resumed_opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint[0])
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    go_on, from_checkpoint = train(model, opt, mesh, 2, args.steps), train(resumed, resumed_opt, mesh, 2, args.steps)
    dist.barrier()  # every rank has read the checkpoint: rank 0 removes it
    if rank == 0:
        print(f"2 more steps: loss {go_on:.6f} going on, {from_checkpoint:.6f} from the checkpoint")
        shutil.rmtree(checkpoint[0])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
