"""The loop's callback seam: observers (tests, tools) subscribe to its events.

``on("save", fn)``: every rank calls ``fn(model=..., step=..., epoch=...)`` right before rank 0
writes a checkpoint, after the ranks were made to hold the same model (the one saved).
``on("step", fn)``: every rank calls ``fn(step=..., epoch=..., loss=...)`` after each optimizer
step. Subscribing changes nothing the loop computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EVENTS = ("save", "step")
_listeners: dict[str, list[Callable[..., None]]] = {name: [] for name in EVENTS}


def on(event: str, fn: Callable[..., None]) -> None:
    """Call ``fn(**info)`` at every ``event`` (one of ``EVENTS``)."""
    if event not in _listeners:
        raise ValueError(f"event must be one of {list(EVENTS)}, got {event!r}")
    _listeners[event].append(fn)


def off(event: str, fn: Callable[..., None]) -> None:
    """Stop calling ``fn`` at ``event``."""
    _listeners[event].remove(fn)


def emit(event: str, **info: Any) -> None:
    for fn in _listeners[event]:
        fn(**info)
