"""Field types shared by the API schemas, so the server accepts exactly what the OpenAPI
document says.

* ``IsoDateTime``: a timezone-aware ISO 8601 / RFC 3339 date-time (``format: date-time``).
  Numbers, which pydantic would otherwise read as Unix times, and times without an offset are
  refused with a schema error (422).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BeforeValidator

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _iso_only(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("expected an ISO 8601 date-time with a time zone, "
                         "e.g. 2026-01-01T00:00:00Z")
    return value


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_only)]
