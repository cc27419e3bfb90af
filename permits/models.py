"""Control-plane tables of this package (filled in as the package grows)."""

from spe.db.base import Base

__all__ = ["Base"]
