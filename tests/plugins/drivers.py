"""Run one behavioural test suite against both coordinators.

A test module that sets ``BOTH_DRIVERS = True`` gets each of its ``env`` tests
twice: with the synchronous :class:`~coordinator.Coordinator` and with the
:class:`~coordinator.AsyncCoordinator`. For the latter, ``env.coordinator()``
returns the async coordinator behind a :class:`Blocking` view: it runs on an
event loop in a background thread, and every coroutine method, async context
manager and async iterator is turned into its blocking counterpart. The test
body stays the same; what runs underneath is the asyncio driver, its async
psycopg connections and its worker threads.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

__all__ = ["Blocking", "EventLoopThread"]


class EventLoopThread:
    """An event loop running in a daemon thread until :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking call from the event loop's own thread would hang")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


_PLAIN = (str, bytes, int, float, bool, type(None), tuple, list, dict, frozenset, set)


class Blocking:
    """A blocking view of an asyncio object: coroutine results are awaited on
    ``runner``'s loop; async context managers become context managers."""

    def __init__(self, target: Any, runner: EventLoopThread) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_runner", runner)

    @property
    def wrapped(self) -> Any:
        """The asyncio object itself."""
        return self._target

    def _wrap(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            value = self._runner.run(_awaited(value))
        if isinstance(value, (*_PLAIN, Blocking)):
            return value
        if callable(value) or hasattr(value, "__aenter__") or _is_async_object(value):
            return Blocking(value, self._runner)
        return value

    def __getattr__(self, name: str) -> Any:
        return self._wrap(getattr(self._target, name))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._target(*args, **kwargs))

    def __enter__(self) -> Any:
        target = self._target
        if hasattr(target, "__aenter__"):
            return self._wrap(self._runner.run(target.__aenter__()))
        return self._wrap(target.__enter__())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Any:
        target = self._target
        if hasattr(target, "__aexit__"):
            return self._runner.run(target.__aexit__(exc_type, exc, tb))
        return target.__exit__(exc_type, exc, tb)

    def __iter__(self) -> Any:
        target = self._target
        if hasattr(target, "__aiter__"):
            it = target.__aiter__()
            while True:
                try:
                    yield self._wrap(self._runner.run(_anext(it)))
                except StopAsyncIteration:
                    return
        else:
            yield from target

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"


_ASYNC_TYPES: dict[type, bool] = {}


def _is_async_object(value: Any) -> bool:
    """Whether ``value``'s type has coroutine methods (an async connection,
    cursor, transaction...)."""
    kind = type(value)
    found = _ASYNC_TYPES.get(kind)
    if found is None:
        found = any(inspect.iscoroutinefunction(getattr(kind, n, None)) for n in dir(kind)
                    if not n.startswith("__"))
        _ASYNC_TYPES[kind] = found
    return found


async def _awaited(value: Any) -> Any:
    return await value


async def _anext(it: Any) -> Any:
    return await it.__anext__()
