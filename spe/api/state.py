"""What the app holds for its lifetime, and FastAPI dependencies to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from spe.config import Settings
from spe.db import Database


@dataclass
class AppState:
    settings: Settings
    db: Database
    extras: dict[str, Any] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.spe
    return state


def get_db(request: Request) -> Database:
    return get_state(request).db


def get_settings_dep(request: Request) -> Settings:
    return get_state(request).settings
