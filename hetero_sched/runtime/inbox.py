"""Work that reaches a running engine from outside it: requests and cancellations (serving).

The serving front door runs on an asyncio loop; the engine runs its event loop in a thread and,
on the wall clock, sleeps until a device reports or the next timer is due. An :class:`Inbox`
is where the front door leaves new requests and cancellations, with a *doorbell* — a
``concurrent.futures.Future`` set when something arrives — that the engine's wait includes, so
a request is taken in at once rather than at the next poll.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Union

from hetero_sched.core.request import Request


@dataclass(frozen=True)
class Cancel:
    """The client of ``request_id`` gave up (it disconnected)."""

    request_id: int


Item = Union[Request, Cancel]


class Inbox:
    """A thread-safe queue of arrivals and cancellations with a doorbell; closing it ends the run
    once everything in flight has finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Item] = []
        self._bell: Future[None] = Future()
        self._closed = False

    def put(self, item: Item) -> None:
        """Leave ``item`` for the engine and ring (from any thread)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine no longer takes requests")
            self._items.append(item)
            self._ring()

    def close(self) -> None:
        """No more items: the engine stops when what it holds has finished."""
        with self._lock:
            self._closed = True
            self._ring()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bell(self) -> "Future[None]":
        """Set once something was left since the last :meth:`take`."""
        return self._bell

    def take(self) -> list[Item]:
        """Everything left so far, in order; the doorbell is reset."""
        with self._lock:
            items, self._items = self._items, []
            if self._bell.done() and not self._closed:
                self._bell = Future()
            return items

    def _ring(self) -> None:
        if not self._bell.done():
            self._bell.set_result(None)
