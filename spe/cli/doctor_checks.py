"""`spe doctor`: check a deployment against the production profile, control by control.

Contract: :func:`run_checks` reads the settings and the machine (files, mounts, programs),
never the data, changes nothing, and returns one :class:`Check` per control of the production
profile: whether it is in place, what was found, and how to put it in place. A development
install (``spe up`` on embedded defaults) fails most of them on purpose; the list is the
operator's to-do list before patient data arrives.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spe.config import DEV_CONSOLE_CLIENT_SECRET, DEV_SECRET, Settings
from workspaces.settings import WorkspaceSettings

SANDBOX_PROGRAMS = ("bwrap", "nft", "setpriv", "ip", "losetup", "mkfs.ext4")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    found: str
    fix: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _profile(s: Settings) -> Check:
    return Check("production profile", s.profile == "prod", f"profile {s.profile!r}",
                 "set SPE_PROFILE=prod (default secrets are then refused at start)")


def _secrets(s: Settings) -> Check:
    secret = s.secret_key.get_secret_value()
    weak = []
    if secret == DEV_SECRET or len(secret) < 32:
        weak.append("the development secret_key")
    if s.console_client_secret.get_secret_value() == DEV_CONSOLE_CLIENT_SECRET:
        weak.append("the development console_client_secret (the console logs nobody in)")
    return Check("server secrets", not weak,
                 "strong secrets are set" if not weak else "; ".join(weak),
                 "put a random secret_key of at least 32 characters and the console client's "
                 "own secret in the settings file (SPE_CONFIG, readable by the service user "
                 "only)")


def _database(s: Settings) -> Check:
    url = s.resolved_database_url
    ok = url.startswith("postgresql")
    kind = url.split(":", 1)[0]
    return Check("control database on PostgreSQL", ok, f"{kind} database",
                 "set database_url to a PostgreSQL database (SQLite is for one-user "
                 "development)")


def _tls_api(s: Settings) -> Check:
    from urllib.parse import urlsplit

    from spe.tls import WORKSPACE_API_HOST, certificate_problems, names_host

    url = s.api_base_url
    problems = [] if url.startswith("https://") else [f"the API is reached at {url}"]
    if s.public_url is None or s.tls_cert_file is not None:  # the SPE terminates TLS itself
        problems += certificate_problems(s.tls_cert_file, s.tls_key_file, s.tls_ca_file,
                                         urlsplit(url).hostname)
        if s.tls_cert_file is not None and not names_host(s.tls_cert_file, WORKSPACE_API_HOST):
            problems.append(f"{s.tls_cert_file} does not name {WORKSPACE_API_HOST} (the "
                            "workspaces' name for the API)")
    return Check("TLS for the API", not problems,
                 "; ".join(problems) or f"{url} with certificate "
                 f"{s.tls_cert_file or 'of the reverse proxy'}",
                 "set tls_cert_file, tls_key_file (0600) and tls_ca_file to certificates from "
                 "your CA (`spe up --tls` makes a local CA for development), or terminate TLS "
                 "in a reverse proxy and set public_url to its https:// address")


def _secret_files(s: Settings) -> Check:
    from spe.config import SECRET_FILE_FIELDS
    from spe.tls import private_key_problem

    problems = []
    for name in SECRET_FILE_FIELDS:
        path = getattr(s, f"{name}_file")
        if path is None:
            problems.append(f"{name} is not read from a file")
        elif (why := private_key_problem(path)) is not None:
            problems.append(why)
    return Check("secrets from files", not problems,
                 "; ".join(problems) or "every secret is read from a private file",
                 "set " + ", ".join(f"{n}_file" for n in SECRET_FILE_FIELDS) + " to files "
                 "of mode 0600 owned by the service user, outside the data directory")


def _service_user(s: Settings) -> Check:
    store = s.store_dir
    if not store.exists():
        return Check("API runs as a service user", False, "no dataset store yet",
                     "ingest a dataset as the service user")
    owner = store.stat().st_uid
    return Check("API runs as a service user", owner != 0,
                 f"the dataset store is owned by uid {owner}",
                 "run the API (and `spe ingest`) as a dedicated unprivileged user that owns "
                 "data_dir; only the hub's sandbox helpers need root")


def _keycloak_answer(s: Settings, url: str) -> str | None:
    """Why the realm's discovery document did not come over verified TLS, or ``None``."""
    import ssl

    import httpx

    issuer = f"{url.rstrip('/')}/realms/{s.keycloak_realm}"
    verify: ssl.SSLContext | bool = True
    if s.tls_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(s.tls_ca_file))
    try:
        response = httpx.get(f"{issuer}/.well-known/openid-configuration", verify=verify,
                             timeout=5, follow_redirects=False)
        found = response.json().get("issuer") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, OSError) as exc:
        return f"{issuer} did not answer over verified TLS ({type(exc).__name__})"
    if found != issuer:
        return f"{issuer} answered HTTP {response.status_code} without that issuer"
    return None


def _keycloak(s: Settings) -> Check:
    url = s.keycloak_url
    if url is None:
        problem: str | None = "the bundled development Keycloak (start-dev, over HTTP)"
    elif not url.startswith("https://"):
        problem = f"keycloak_url {url} is not https"
    else:
        problem = _keycloak_answer(s, url)
    return Check("Keycloak in production mode over TLS", problem is None,
                 problem or f"{url} answers over TLS verified by the CA bundle",
                 "run Keycloak in production mode with its own PostgreSQL "
                 "(infra/keycloak/keycloak-prod.sh; infra/k8s/keycloak.yaml in a cluster), "
                 "set keycloak_url to its https:// address and tls_ca_file to a bundle "
                 "holding its CA")


def _store(s: Settings) -> Check:
    store = s.store_dir
    if not store.exists():
        return Check("dataset store private to the service", False, "no dataset store yet",
                     "ingest a dataset (the store is created with mode 0700)")
    st = store.stat()
    mode = stat.S_IMODE(st.st_mode)
    ok = mode & 0o077 == 0 and os.geteuid() in (0, st.st_uid)
    return Check("dataset store private to the service", ok,
                 f"{store} mode {mode:04o}, owner uid {st.st_uid}",
                 "chmod 0700 the store and let only the service user own it")


def _mount_source(path: Path) -> str | None:
    """The device of the mount holding ``path`` (longest mount point prefix)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for line in mounts:
        parts = line.split()
        if len(parts) < 2:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), parts[0])
    return best[1] if best else None


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` lies on a dm-crypt (LUKS) device."""
    source = _mount_source(path)
    if source is None or not source.startswith("/dev/"):
        return False
    try:
        dev = Path(source).resolve().name  # /dev/mapper/x -> dm-N
        uuid = (Path("/sys/block") / dev / "dm" / "uuid").read_text().strip()
    except OSError:
        return False
    return uuid.startswith("CRYPT-")


ENCRYPTED_PARTS = (("dataset store", "store"), ("extracts", "extracts"))


def _fscrypt_policy(path: Path) -> bool:
    from workspaces.fscrypt import policy_identifier

    try:
        return path.is_dir() and policy_identifier(path) is not None
    except OSError:
        return False


def _encryption(s: Settings, what: str, part: str) -> Check:
    where = s.data_dir / part
    probe = where if where.exists() else s.data_dir
    if probe.exists() and is_encrypted(probe):
        found, ok = f"{where} is on an encrypted device", True
    elif _fscrypt_policy(where):
        found, ok = f"{where} is under an fscrypt policy", True
    else:
        found, ok = f"{where} is neither on an encrypted device nor under fscrypt", False
    return Check(f"encryption at rest: {what}", ok, found,
                 f"`spe encryption setup {where} --key-file F` (ext4 fscrypt, a master key "
                 "file outside the data directory) while it is empty, or put it on a "
                 "dm-crypt/LUKS volume whose key is kept outside the data directory")


def _disk_images(s: Settings, ws: WorkspaceSettings) -> Check:
    """Disk images: on dm-crypt, or fscrypt with a private master key outside data_dir."""
    from spe.tls import private_key_problem

    on_device = _encryption(s, "workspace disk images", "workspaces")
    if on_device.ok:
        return on_device
    key = ws.disk_key_file
    if key is None:
        problem = "disk_key_file is not set and " + on_device.found
    elif (why := private_key_problem(key)) is not None:
        problem = why
    elif key.resolve().is_relative_to(s.data_dir.resolve()):
        problem = f"{key} lies inside the data directory"
    elif not Path("/sys/fs/ext4/features/encryption").exists():
        problem = "this kernel's ext4 has no encryption (fscrypt)"
    else:
        problem = None
    return Check(on_device.name, problem is None,
                 problem or f"fscrypt per workspace, master key {key}",
                 "set SPE_WS_DISK_KEY_FILE to a file of 32+ random bytes, mode 0600, outside "
                 "the data directory (home and /tmp of each image are then encrypted; older "
                 "homes stay plain until recreated), or put the images on a LUKS volume")


def _sandbox() -> Check:
    missing = [p for p in SANDBOX_PROGRAMS if shutil.which(p) is None]
    cgroup2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    found = "missing: " + ", ".join(missing) if missing else "all sandbox programs present"
    found += "; cgroup v2" if cgroup2 else "; cgroup v1"
    from workspaces.errors import UnsupportedArchitecture
    from workspaces.seccomp import program

    try:
        program()
    except UnsupportedArchitecture as exc:  # the sandbox does not start without a filter
        return Check("workspace sandbox", False, f"{found}; {exc}",
                     "run the SPE on x86_64 or aarch64")
    return Check("workspace sandbox", not missing, found,
                 "install bubblewrap, nftables, util-linux, iproute2 and e2fsprogs")


def run_checks(s: Settings, ws: WorkspaceSettings | None = None) -> list[Check]:
    """Every control; ``ws``: the workspaces' settings (default: from the environment)."""
    if ws is None:
        from workspaces.settings import get_workspace_settings

        ws = get_workspace_settings()
    return [_profile(s), _secrets(s), _secret_files(s), _database(s), _tls_api(s),
            _keycloak(s), _store(s), _service_user(s),
            *(_encryption(s, what, part) for what, part in ENCRYPTED_PARTS),
            _disk_images(s, ws), _sandbox()]
