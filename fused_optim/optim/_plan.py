"""A param group's op arguments kept between steps, less the grads: host time matters at a thousand tensors a step,
so an optimizer builds its lists once and, on later steps, only puts the new grads in; it builds them again when
which params have grads, the params (one put in another's place in the group's list, or its memory layout or dtype
changed: `model.to(memory_format=...)`, `model.to(torch.bfloat16)`), the state or the options that decide the op
calls changed. A param's state changed means: its state dict replaced (`opt.state[p] = {}`), or an entry of it
added, removed or set to another tensor (`opt.state[p]["step"] = torch.tensor(0.)`), as torch's optimizers, which
read the state every step, see."""

from __future__ import annotations

import operator
from itertools import chain
from typing import Any, Hashable

from torch import Tensor

_DTYPE = operator.attrgetter("dtype")


class Plan:
    """For each kind of write-back ("plain", "master", ...: one op call each), the indices of the params it steps
    and its lists [params, *state lists]; `with_grads` gives the op's [params, grads, *state lists], by (kind, call).
    The call is 0 but for a param the group holds more than once (torch warns of that), which goes into call 1 of its
    kind the second time, and so on: in one op call the kernels would update it from two threads at once, and so,
    call after call, it is stepped once each time, as torch's for-loop steps it. torch's own update ("torch") takes
    it twice in one call: it steps its list one param after the other."""

    def __init__(self, group: dict[str, Any], state: dict, has_grad: list[bool], options: Hashable) -> None:
        self.params = group["params"]
        self.members = list(self.params)  # the list may be changed in place: `params[0] = new_param`
        self.strides = list(map(Tensor.stride, self.members))
        self.dtypes = [p.dtype for p in self.members]  # (dynamo traces this, but not an attrgetter)
        self.options = options
        self.state = state
        self.state_size = len(state)
        self.has_grad = has_grad  # which params the lists hold: frozen ones have no grad
        # the stepped params that have state (SGD without momentum keeps none), their state dicts and every value in
        # them, all by identity
        self.with_state: list[Tensor] = []
        self.param_states: list[dict] = []
        self.state_values: list[Any] = []
        self.calls: dict[tuple[str, int], tuple[list[int], list[list[Tensor]]]] = {}
        self.ids_in_call: dict[tuple[str, int], set[int]] = {}

    def add(self, kind: str, index: int, p: Tensor, state_tensors: list[Tensor | None]) -> None:
        """Param `index` of the group, stepped by op call `kind` with `state_tensors` (one per state list; None
        where the list stays empty, e.g. no master copy)."""
        call = 0
        while kind != "torch" and id(p) in self.ids_in_call.get((kind, call), ()):
            call += 1
        self.ids_in_call.setdefault((kind, call), set()).add(id(p))
        indices, lists = self.calls.setdefault((kind, call), ([], [[] for _ in range(1 + len(state_tensors))]))
        indices.append(index)
        lists[0].append(p)
        for tensors, tensor in zip(lists[1:], state_tensors):
            if tensor is not None:
                tensors.append(tensor)

    def remember_state(self) -> None:
        """Takes the state as it is now (the lists' tensors, made or found) as the state the lists were made from."""
        self.state_size = len(self.state)
        self.with_state = [p for p, has in zip(self.params, self.has_grad) if has and p in self.state]
        self.param_states = [self.state[p] for p in self.with_state]
        self.state_values = list(chain.from_iterable(map(dict.values, self.param_states)))

    def fits(self, group: dict[str, Any], state: dict, has_grad: list[bool], options: Hashable) -> bool:
        # identity, not equality, throughout (a tensor's == is elementwise), in C-level loops: ~0.25 us a param here.
        # The strides a param at a time: a list of a thousand stride tuples would set off the garbage collector.
        return (
            group["params"] is self.params
            and len(self.params) == len(self.members)
            and all(map(operator.is_, self.params, self.members))
            and all(map(operator.eq, map(Tensor.stride, self.params), self.strides))
            and all(map(operator.is_, map(_DTYPE, self.params), self.dtypes))  # model.to(dtype) keeps the params
            and state is self.state
            and len(state) == self.state_size
            and options == self.options
            and has_grad == self.has_grad
            and all(map(operator.is_, map(state.get, self.with_state), self.param_states))
            and sum(map(len, self.param_states)) == len(self.state_values)
            and all(map(operator.is_, chain.from_iterable(map(dict.values, self.param_states)), self.state_values))
        )

    def with_grads(self, grads: list[Tensor | None]) -> dict[tuple[str, int], list[list[Tensor]]]:
        lists = {}
        for kind_call, (indices, (params, *state_lists)) in self.calls.items():
            kind_grads = grads if len(indices) == len(grads) else [grads[i] for i in indices]
            lists[kind_call] = [params, kind_grads, *state_lists]
        return lists
