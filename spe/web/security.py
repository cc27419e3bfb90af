"""Headers every console page carries, and the CSRF check of every form.

* :func:`headers` gives a strict Content-Security-Policy: nothing but the SPE's own origin
  (``default-src 'none'``; styles and images from ``'self'``; no script at all, inline or not;
  forms post only to the SPE and, for logout, to the realm's Keycloak; no framing), plus
  ``Referrer-Policy: same-origin`` (with ``no-referrer`` browsers send ``Origin: null`` on
  form posts) and ``Cache-Control: no-store`` (the API middleware adds
  ``X-Content-Type-Options``).
* :func:`check_csrf` compares a form's ``csrf`` field with the session's token in constant time
  and refuses a cross-site ``Origin``; the caller audits the refusal and answers 403.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from spe.config import Settings


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def csp(settings: Settings) -> str:
    keycloak = _origin(settings.keycloak_base_url)
    return ("default-src 'none'; style-src 'self'; img-src 'self'; font-src 'self'; "
            f"form-action 'self' {keycloak}; frame-ancestors 'none'; base-uri 'none'")


def headers(settings: Settings) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp(settings),
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
    }


def same_origin(origin: str | None, base_url: str, request_origin: str) -> bool:
    """A missing Origin passes (old browsers); a present one must be the SPE's."""
    if origin is None:
        return True
    return origin in (_origin(base_url), request_origin)


def check_csrf(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
