"""The browser gate's decisions: which host is which origin, which routes are downloads, the
byte budget. The live gate is tested in tests/security/test_browser_egress.py."""

from __future__ import annotations

import pytest

from workspaces.browser_gate import Budget, blocked_reason, classify, workspace_host
from workspaces.lifecycle import server_name

SERVER = server_name("5f7b0f6b-0095-4565-96ef-4f5441a8b000")
PREFIX = f"/user/alice/{SERVER}/"


def test_each_server_has_its_own_host() -> None:
    other = server_name("00000000-0000-0000-0000-000000000001")
    a = workspace_host("alice", SERVER, "localhost")
    assert a == f"{SERVER}--alice.localhost"
    assert len({a, workspace_host("alice", other, "localhost"),
                workspace_host("bob", SERVER, "localhost")}) == 3
    assert classify(a, "127.0.0.1", "localhost").kind == "workspace"
    assert classify(a.upper() + ".", "127.0.0.1", "localhost").user == "alice"


@pytest.mark.parametrize("host,kind", [
    ("127.0.0.1", "hub"),
    ("alice.localhost", "user"),
    ("localhost", "unknown"),                       # the bare user domain is not the hub
    ("x.alice.localhost", "unknown"),               # nested labels
    (f"{SERVER}--alice--x.localhost", "unknown"),   # ambiguous user name
    (f"{SERVER}--alice.evil.org", "unknown"),
    ("hub--service.localhost", "unknown"),
    (f"{SERVER[:-1]}--alice.localhost", "unknown"),  # not a server name
])
def test_hosts(host: str, kind: str) -> None:
    assert classify(host, "127.0.0.1", "localhost").kind == kind


def test_names_that_cannot_be_a_label_are_refused() -> None:
    assert workspace_host("Alice", SERVER, "localhost") is None
    assert workspace_host("a" * 40, SERVER, "localhost") is None
    assert workspace_host("alice", "lab", "localhost") is None


@pytest.mark.parametrize("path,query", [
    ("files/data.csv", ""), ("files", ""), ("FILES/data.csv", ""), ("view/x.html", ""),
    ("nbconvert/html/a.ipynb", ""), ("api/nbconvert/html", ""),
    ("%66iles/data.csv", ""), ("%2566iles/data.csv", ""), ("lab/../files/data.csv", ""),
    ("lab/%2e%2e/files/x", ""), ("api/contents/data.csv", "download=1"),
    ("api/contents/data.csv", "content=1&DOWNLOAD=true"), ("x", "download="),
])
def test_download_routes_are_refused(path: str, query: str) -> None:
    assert blocked_reason(PREFIX + path, query, PREFIX) is not None


@pytest.mark.parametrize("path,query", [
    ("lab", ""), ("api/contents/data.csv", "content=1"), ("api/kernels", ""),
    ("api/nbconvert", ""), ("api/contents/files.txt", ""), ("lab/tree/view.ipynb", ""),
    ("api/contents/x", "download=0"),
])
def test_working_routes_pass(path: str, query: str) -> None:
    assert blocked_reason(PREFIX + path, query, PREFIX) is None


def test_budget_counts_per_workspace_and_reports_tenths() -> None:
    budget = Budget(limit=1000)
    assert budget.charge("a", 50) == (True, False)
    assert budget.charge("a", 60) == (True, True)     # 110: first tenth crossed
    assert budget.charge("b", 990) == (True, True)    # another workspace counts apart
    assert budget.charge("a", 890) == (True, True)    # exactly the budget is allowed
    assert budget.charge("a", 1)[0] is False
    assert budget.get("a").used == 1001
