"""Plain-torch references in float64: the oracle every test compares the kernels with.

Written for clarity, not speed: one tensor at a time, the textbook formulas, no fusion.
"""

from __future__ import annotations

import torch

class ReferenceAdam:
    """Adam/AdamW (Kingma & Ba, 2015; Loshchilov & Hutter, 2019) in float64, with AMSGrad and maximize.

    >>> p = torch.randn(3); ref = ReferenceAdam([p], lr=0.1, weight_decay=0.01, decoupled_weight_decay=True)
    >>> ref.step([torch.randn(3)]); ref.params[0].dtype
    torch.float64
    """

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, amsgrad=False, maximize=False):
        self.params = [p.detach().double().clone() for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.decoupled_weight_decay = weight_decay, decoupled_weight_decay
        self.amsgrad, self.maximize = amsgrad, maximize
        self.steps = 0

    def step(self, grads, grad_scale: float = 1.0) -> None:
        self.steps += 1
        t = self.steps
        for i, grad in enumerate(grads):
            g = grad.detach().double() / grad_scale
            if self.maximize:
                g = -g
            p = self.params[i]
            if self.weight_decay != 0:
                if self.decoupled_weight_decay:
                    p.mul_(1 - self.lr * self.weight_decay)
                else:
                    g = g + self.weight_decay * p
            m = self.exp_avgs[i].mul_(self.beta1).add_((1 - self.beta1) * g)
            v = self.exp_avg_sqs[i].mul_(self.beta2).add_((1 - self.beta2) * g * g)
            if self.amsgrad:
                v = torch.maximum(self.max_exp_avg_sqs[i], v, out=self.max_exp_avg_sqs[i])
            m_hat = m / (1 - self.beta1**t)
            v_hat = v / (1 - self.beta2**t)
            p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class ReferenceSGD:
    """SGD with momentum, dampening, Nesterov momentum, L2 weight decay and maximize, in float64; the first step
    with momentum sets the buffer to the gradient (torch.optim.SGD's rule).

    >>> p = torch.randn(3); ref = ReferenceSGD([p], lr=0.1, momentum=0.9, nesterov=True)
    >>> ref.step([torch.randn(3)]); ref.momentum_buffers[0].dtype
    torch.float64
    """

    def __init__(self, params, *, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        self.params = [p.detach().double().clone() for p in params]
        self.momentum_buffers: list[torch.Tensor | None] = [None for _ in self.params]
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, nesterov, maximize

    def step(self, grads, grad_scale: float = 1.0) -> None:
        for i, grad in enumerate(grads):
            g = grad.detach().double() / grad_scale
            if self.maximize:
                g = -g
            p = self.params[i]
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            if self.momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = self.momentum_buffers[i] = g.clone()
                else:
                    buf.mul_(self.momentum).add_((1 - self.dampening) * g)
                g = g + self.momentum * buf if self.nesterov else buf
            p.sub_(self.lr * g)


class ReferenceLion:
    """Lion (Chen et al., 2023) with decoupled weight decay and maximize, in float64: the update is the sign of an
    interpolation of the moment and the gradient (torch.sign: 0 for 0), and the moment has its own beta.

    >>> p = torch.randn(3); ref = ReferenceLion([p], lr=1e-4, weight_decay=0.1)
    >>> ref.step([torch.randn(3)]); ref.exp_avgs[0].dtype
    torch.float64
    """

    # A direction within this fraction of its terms' size of 0 has no sign an fp32 implementation can be held to:
    # rounding its two products may give either sign, or 0 (a cancellation exact in float64).
    AMBIGUOUS = 1e-6

    def __init__(self, params, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params = [p.detach().double().clone() for p in params]
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        # per element: whether any step's direction was within rounding of 0 (see AMBIGUOUS)
        self.ambiguous = [torch.zeros_like(p, dtype=torch.bool) for p in self.params]
        self.lr, (self.beta1, self.beta2), self.weight_decay, self.maximize = lr, betas, weight_decay, maximize

    def step(self, grads, grad_scale: float = 1.0) -> None:
        for i, grad in enumerate(grads):
            g = grad.detach().double() / grad_scale
            if self.maximize:
                g = -g
            p, m = self.params[i], self.exp_avgs[i]
            p.mul_(1 - self.lr * self.weight_decay)
            direction = self.beta1 * m + (1 - self.beta1) * g
            size = self.beta1 * m.abs() + (1 - self.beta1) * g.abs()
            self.ambiguous[i] |= direction.abs() <= self.AMBIGUOUS * size
            p.sub_(self.lr * torch.sign(direction))
            m.mul_(self.beta2).add_((1 - self.beta2) * g)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of (N, C) logits and (N,) class indices in float64, differentiable: (loss, z-loss), the
    loss including the z-loss.

    Per kept row i (target != ignore_index), with z = softcap * tanh(logits / softcap) when soft-capped,
    log p = log_softmax(z), w the class weights (ones without), eps the label smoothing, C the classes:
        ce_i = -(1 - eps) * w[t_i] * log p[i, t_i] - eps / C * sum_j w_j * log p[i, j]        (torch's formula)
        z_i  = z_loss * logsumexp(z[i])^2                                                       (PaLM)
    "mean" divides the sum of ce by the sum of w[t_i] over kept rows and the sum of z by their count; ignored rows
    add nothing; "none" returns per-row values (0 for ignored rows).
    """
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    num_classes = z.shape[1]
    w = weight.double() if weight is not None else torch.ones(num_classes, dtype=torch.float64, device=z.device)
    kept = target != ignore_index
    safe_target = torch.where(kept, target, 0)
    log_p = torch.log_softmax(z, dim=1)
    nll = -w[safe_target] * log_p.gather(1, safe_target[:, None])[:, 0]
    smooth = -(log_p * w).sum(1)
    ce = torch.where(kept, (1 - label_smoothing) * nll + label_smoothing / num_classes * smooth, 0.0)
    z_rows = torch.where(kept, z_loss * torch.logsumexp(z, dim=1) ** 2, 0.0)
    if reduction == "none":
        return ce + z_rows, z_rows
    if reduction == "sum":
        return ce.sum() + z_rows.sum(), z_rows.sum()
    ce_mean = ce.sum() / torch.where(kept, w[safe_target], 0.0).sum()
    z_mean = z_rows.sum() / kept.sum()
    return ce_mean + z_mean, z_mean


def reference_accumulate(main_grads: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """`main_grads[i] + grads[i]` in float64 (the sums fused_optim::accumulate_grads_ rounds to fp32 in place).

    >>> reference_accumulate([torch.ones(2)], [torch.full((2,), 0.5, dtype=torch.bfloat16)])[0]
    tensor([1.5000, 1.5000], dtype=torch.float64)
    """
    return [m.detach().double() + g.detach().double() for m, g in zip(main_grads, grads)]


def reference_total_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type`-norm of all elements of `tensors` as one vector, in float64: (sum |x|^p)^(1/p), max |x| for
    p = inf, 0 for no elements; NaN anywhere gives NaN. |x| of a complex element is its modulus.

    >>> reference_total_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]).item()
    5.0
    """
    flat = torch.cat([t.detach().cpu().flatten().to(torch.complex128 if t.is_complex() else torch.float64).abs()
                      for t in tensors])
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    if norm_type == float("inf"):
        return flat.max()  # torch's max propagates NaN
    return flat.pow(norm_type).sum().pow(1.0 / norm_type)
