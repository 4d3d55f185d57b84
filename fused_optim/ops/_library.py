"""The `fused_optim` torch.library namespace: every op schema of the package is defined in it."""

import torch

lib = torch.library.Library("fused_optim", "DEF")


def refuse_sparse_grads(op_names: tuple[str, ...], message: str) -> None:
    """A sparse grad sends a call of these ops to the sparse dispatch keys: raise `message` there (the optimizer's
    own sentence) rather than the dispatcher's "no kernel" error."""

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    for name in op_names:
        for dispatch_key in ("SparseCPU", "SparseCUDA"):
            lib.impl(name, refuse, dispatch_key)
