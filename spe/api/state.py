"""What the app holds for its lifetime: settings, the database and typed service slots.

Contract
--------
* ``AppState`` is created once per app (``spe.api.app.create_app``) and reached from a request
  with :func:`get_state` (or the dependencies in ``spe.api.deps``).
* Packages keep their long-lived objects (a service, a sweeper, a token validator) in typed
  slots: declare ``KEY: StateKey[Thing] = StateKey("package.thing")`` next to the thing, then
  ``state.get_or_create(KEY, factory)`` (created once, thread-safe), ``state.get(KEY)`` or
  ``state.put(KEY, value)`` (tests swap in their own). The type checker sees ``Thing``, never
  ``Any``; the kernel never imports the packages whose objects it holds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from fastapi import Request

from spe.config import Settings
from spe.db import Database

T = TypeVar("T")


@dataclass(frozen=True)
class StateKey(Generic[T]):
    """The name of one typed slot of :class:`AppState` (``StateKey[Thing]("pkg.thing")``)."""

    name: str


@dataclass
class AppState:
    settings: Settings
    db: Database
    _slots: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def get(self, key: StateKey[T]) -> T | None:
        return cast("T | None", self._slots.get(key.name))

    def put(self, key: StateKey[T], value: T | None) -> None:
        """Set (or with ``None`` clear) a slot; tests use it to swap in their own object."""
        if value is None:
            self._slots.pop(key.name, None)
        else:
            self._slots[key.name] = value

    def get_or_create(self, key: StateKey[T], factory: Callable[[], T]) -> T:
        """The slot's object, created by ``factory`` on first use (once, even under threads)."""
        value = self._slots.get(key.name)
        if value is None:
            with self._lock:
                value = self._slots.get(key.name)
                if value is None:
                    value = factory()
                    self._slots[key.name] = value
        return cast("T", value)

    @property
    def slots(self) -> Mapping[str, Any]:
        """Read-only view of the slots by name (for lookups that take a mapping)."""
        return self._slots


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.spe
    return state


def get_db(request: Request) -> Database:
    return get_state(request).db


def get_settings_dep(request: Request) -> Settings:
    return get_state(request).settings
