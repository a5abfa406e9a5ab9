"""Forward hooks that cannot outlive their use, and one way to stop a forward pass early.

Statistics, tuning and model discovery all observe a block by hooking its modules for one pass;
a hook left behind after an error would keep observing (or masking) every later forward. `Hooks`
removes what it registered when its `with` block ends, however it ends. A hook that has seen all it
needs raises `StopForward`; `stops_forward()` around the call swallows exactly that.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


def stop_forward(*_: Any, **__: Any) -> None:
    """A hook (pre or post) that ends the forward pass when its module is reached or done."""
    raise StopForward


def stops_forward() -> contextlib.suppress:
    """`with stops_forward(): model(...)`: a forward pass a hook may end early."""
    return contextlib.suppress(StopForward)


class Hooks(contextlib.AbstractContextManager):
    """Register forward hooks with `pre` / `post`; all are removed when the `with` block ends."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> Hooks:
        """A forward pre-hook `hook(module, args)` (with `with_kwargs`: `hook(module, args, kwargs)`)."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        return self

    def post(self, module: nn.Module, hook: Callable[..., Any]) -> Hooks:
        """A forward hook `hook(module, args, output)`."""
        self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
