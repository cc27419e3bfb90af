"""Control-plane database: SQLAlchemy 2 engine, declarative base and transaction helpers."""

from spe.db.base import Base
from spe.db.engine import Database, make_engine

__all__ = ["Base", "Database", "make_engine"]
