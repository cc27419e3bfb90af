"""Permit groups against the real Keycloak: created with the authorised persons, amended,
removed; unknown persons are an error the access body sees, and no account is ever created."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from spe.auth.groups import (
    PermitGroups,
    provision_permit_group,
    remove_permit_group,
    sync_permit_group,
    users_exist,
)
from spe.config import Settings
from spe.errors import InvalidInput


@pytest.fixture
def kc_settings(keycloak_url: str) -> Settings:
    return Settings(keycloak_url=keycloak_url)


@pytest.fixture
def permit_id(kc_settings: Settings) -> Any:
    pid = f"T-{uuid.uuid4().hex[:10]}"
    yield pid
    remove_permit_group(pid, settings=kc_settings)


def _members(admin: Any, permit_id: str) -> set[str]:
    group = admin.get_group_by_path(f"/permit-{permit_id}")
    return {m["username"] for m in admin.get_group_members(group["id"])}


def test_users_exist_reports_unknown_people(kc_settings: Settings) -> None:
    assert users_exist(["alice", "bob", "hadmin"], settings=kc_settings) == set()
    assert users_exist(["alice", "mallory", "trent"], settings=kc_settings) == {"mallory",
                                                                              "trent"}


def test_provision_amend_and_remove_a_permit_group(
    kc_settings: Settings, keycloak_admin: Any, permit_id: str
) -> None:
    change = provision_permit_group(permit_id, ["alice", "bob"], settings=kc_settings)
    assert change.group == f"permit-{permit_id}"
    assert change.added == {"alice", "bob"}
    assert _members(keycloak_admin, permit_id) == {"alice", "bob"}
    # idempotent
    again = provision_permit_group(permit_id, ["alice", "bob"], settings=kc_settings)
    assert again.group_id == change.group_id and not again.added and not again.removed

    amended = sync_permit_group(permit_id, ["alice", "carol"], settings=kc_settings)
    assert amended.added == {"carol"} and amended.removed == {"bob"}
    assert _members(keycloak_admin, permit_id) == {"alice", "carol"}

    assert remove_permit_group(permit_id, settings=kc_settings) is True
    assert PermitGroups(kc_settings).find_group(permit_id) is None
    assert remove_permit_group(permit_id, settings=kc_settings) is False


def test_group_membership_reaches_the_token(
    kc_settings: Settings, keycloak_url: str, permit_id: str
) -> None:
    import jwt

    from tests.keycloak_fixtures import fetch_user_token

    provision_permit_group(permit_id, ["bob"], settings=kc_settings)
    claims = jwt.decode(fetch_user_token(keycloak_url, "bob"),
                        options={"verify_signature": False})
    assert f"permit-{permit_id}" in claims["groups"]


def test_unknown_person_is_an_error_and_creates_nothing(
    kc_settings: Settings, keycloak_admin: Any, permit_id: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        provision_permit_group(permit_id, ["alice", "mallory"], settings=kc_settings)
    assert "mallory" in err.value.detail
    assert err.value.errors == [{"loc": ["authorised_persons"], "msg": "unknown person",
                                 "username": "mallory"}]
    assert PermitGroups(kc_settings).find_group(permit_id) is None
    assert keycloak_admin.get_user_id("mallory") is None

    provision_permit_group(permit_id, ["alice"], settings=kc_settings)
    with pytest.raises(InvalidInput):
        sync_permit_group(permit_id, ["alice", "eve"], settings=kc_settings)
    assert _members(keycloak_admin, permit_id) == {"alice"}
    assert keycloak_admin.get_user_id("eve") is None


def test_bad_permit_id_is_refused(kc_settings: Settings) -> None:
    with pytest.raises(InvalidInput):
        provision_permit_group("../evil", ["alice"], settings=kc_settings)


def test_wrong_admin_credentials_are_a_service_error(keycloak_url: str) -> None:
    from spe.errors import ServiceUnavailable

    settings = Settings(keycloak_url=keycloak_url, keycloak_admin_password="wrong")
    with pytest.raises(ServiceUnavailable) as err:
        users_exist(["alice"], settings=settings)
    assert "wrong" not in err.value.detail
