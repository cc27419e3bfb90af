"""Workspace servers' cookies: the hub's options with ``SameSite=Lax``.

Opening a workspace from the hub is a cross-site navigation (each workspace has a site of its
own), so a ``Strict`` OAuth state cookie never came back to ``oauth_callback`` and the server
answered 403 after a start from the spawn page (found by tests/e2e/test_walkthrough_browser.py,
which is the end-to-end check). The hub's own options are left as they are.
"""

from __future__ import annotations

from workspaces.spawner import server_cookie_options


def test_lax_and_the_rest_kept() -> None:
    hub = {"SameSite": "Strict", "HttpOnly": True, "Secure": True}
    assert server_cookie_options(hub) == {"SameSite": "Lax", "HttpOnly": True, "Secure": True}
    assert hub["SameSite"] == "Strict"  # not changed in place
    assert server_cookie_options({}) == {"SameSite": "Lax"}
