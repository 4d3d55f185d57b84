"""The fused losses are differentiable once: their backward scales a gradient the forward wrote (or recomputes it in
the kernels), outside autograd, so that gradient carries no graph of its own. Differentiating it again
(`create_graph=True`: Hessian-vector products, gradient penalties, double backward) must raise, never give a second
derivative that silently leaves the loss's own term out.

torch's `once_differentiable` is not enough here. It marks the gradients only when an incoming gradient requires
grad, which a plain `torch.autograd.grad(loss, params, create_graph=True)` does not hand in; and even marked, they
hang off fresh leaves, so a second backward towards the parameters never reaches the mark (autograd runs only the
nodes on a path to the inputs asked for). So under create_graph=True the gradients are made to depend on the loss
itself, the forward's saved output, through a node that raises: every second backward through them reaches it,
and none that stays first-order does.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions


def differentiable_once(name: str):
    """Decorates the backward of an autograd.Function whose forward saved its (differentiable) loss output last in
    `ctx.save_for_backward`: the backward runs without building a graph, and under create_graph=True the gradients
    it returns raise one sentence naming the loss `name` when they are differentiated."""
    message = (f"fused_optim's {name} is differentiable once: its gradient cannot be differentiated again "
               f"(create_graph=True); use torch's own loss for second derivatives.").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            # the loss's grad_fn is this Function's node: the way back to the inputs. Read before the backward,
            # which may scale saved gradients in place (autograd then refuses to hand out its saved tensors).
            loss = ctx.saved_tensors[-1] if torch.is_grad_enabled() else None
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if loss is None:
                return grads
            present = [i for i, g in enumerate(grads) if g is not None]
            marked = _functions.DelayedError(message, len(present) + 1)(*(grads[i] for i in present), loss)
            grads = list(grads)
            for i, g in zip(present, marked):
                grads[i] = g
            return tuple(grads)

        return wrapper

    return decorate
