"""Post-accumulate-grad hooks that do not keep their owner (a gradient_release optimizer, a GradAccumulator with
`use_hooks=True`) alive.

A param outlives the objects that hook it: a user who replaces or deletes an optimizer expects backward to leave
the grads again, as with any torch optimizer. A hook holding its owner would keep it stepping, or accumulating and
freeing the grads, for as long as the param lives. So a hook holds its owner weakly, and the owner's handles are
removed when the owner is collected."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.utils.hooks import RemovableHandle


def register_weak_hook(owner: Any, p: Tensor, method: Callable[..., None], *args: Any) -> RemovableHandle:
    """Registers `method(owner, *args, p)` as `p`'s post-accumulate-grad hook, holding `owner` weakly."""
    owner_ref = weakref.ref(owner)

    def hook(param: Tensor) -> None:
        live = owner_ref()
        if live is not None:
            method(live, *args, param)

    return p.register_post_accumulate_grad_hook(hook)


def remove_when_collected(owner: Any, handles: Iterable[RemovableHandle]) -> None:
    """When `owner` is collected, removes the handles then in `handles`: a live container (a list, a dict's
    values()) that the owner keeps up to date and that does not refer to the owner."""
    weakref.finalize(owner, _remove, handles)


def _remove(handles: Iterable[RemovableHandle]) -> None:
    for handle in list(handles):
        handle.remove()
