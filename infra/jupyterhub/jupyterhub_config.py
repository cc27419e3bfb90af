"""JupyterHub for the SPE: Keycloak login (researchers only), one sandboxed server per permit.

Read from the environment (``spe up`` and :mod:`workspaces.hub` set them):
  SPE_HUB_OAUTH_CLIENT_SECRET   secret of the confidential Keycloak client ``jupyterhub``
                                (or SPE_HUB_OAUTH_CLIENT_SECRET_FILE: a file only its owner
                                may access; likewise SPE_HUB_CRYPT_KEY_FILE)
  SPE_HUB_CRYPT_KEY             32-byte hex key encrypting auth state (JUPYTERHUB_CRYPT_KEY);
                                unset: a random key is kept in <data_dir>/hub/crypt_key (0600)
  SPE_HUB_PUBLIC_URL            where users reach the hub (default http://127.0.0.1:8000)
  SPE_HUB_PROXY_API_PORT        the proxy's REST API port on loopback (default 8001)
  SPE_HUB_PROXY_PORT            the proxy's public side, on loopback behind the browser gate
                                (default 8002)
  SPE_HUB_USER_DOMAIN           domain whose subdomains serve the workspaces, one origin per
                                (researcher, permit): <server>--<user>.<domain> (default
                                localhost; production: a wildcard DNS record and a wildcard
                                certificate, given as SPE_GATE_SSL_CERT / SPE_GATE_SSL_KEY)
Everything else comes from spe.config (SPE_*) and workspaces.settings (SPE_WS_*).

What lives where: the hub state DB, cookie secret, crypt key, proxy pid file and the
permit-event cursor are in <data_dir>/hub (0700, root); sandboxes never bind the data dir.
"""

import json
import os
import secrets
import sys
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from spe.config import get_settings, secret_from_env
from workspaces.hub import user_subdomain
from workspaces.hub_auth import SPEKeycloakAuthenticator
from workspaces.settings import get_workspace_settings
from workspaces.spawner import SandboxSpawner

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by JupyterHub

spe = get_settings()
ws = get_workspace_settings()
hub_dir = (spe.data_dir / "hub").resolve()
hub_dir.mkdir(parents=True, exist_ok=True)
hub_dir.chmod(0o700)
public = os.environ.get("SPE_HUB_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
secure = public.startswith("https://")
realm = f"{spe.keycloak_base_url}/realms/{spe.keycloak_realm}/protocol/openid-connect"

# Auth state encryption key: given, or generated once and kept in the 0700 hub dir.
key = secret_from_env("SPE_HUB_CRYPT_KEY")
if not key:
    key_file = hub_dir / "crypt_key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    key = key_file.read_text().strip()
os.environ["JUPYTERHUB_CRYPT_KEY"] = key

# One origin per workspace (DESIGN §6): the browser gate (workspaces.browser_gate, a managed
# service below) is the public listener; the proxy listens on loopback behind it, in
# JupyterHub's subdomain mode with user domains under SPE_HUB_USER_DOMAIN, a different site from
# the hub's host. The gate serves each named server on its own host and is where the browser
# stops being an export path (no download routes, a byte budget, upload limits).
parsed_public = urlparse(public)
user_domain = os.environ.get("SPE_HUB_USER_DOMAIN", "localhost").lower()
proxy_port = int(os.environ.get("SPE_HUB_PROXY_PORT", "8002"))
port_part = f":{parsed_public.port}" if parsed_public.port else ""
c.JupyterHub.public_url = public + "/"
c.JupyterHub.subdomain_host = f"{parsed_public.scheme}://{user_domain}{port_part}"
c.JupyterHub.subdomain_hook = partial(user_subdomain, user_domain=user_domain)

# Hub, proxy, state: loopback only; secrets in the 0700 hub dir, never in a workspace.
c.JupyterHub.bind_url = f"http://127.0.0.1:{proxy_port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = ws.allowed_host_ports[0]
c.JupyterHub.cookie_secret_file = str(hub_dir / "jupyterhub_cookie_secret")
c.JupyterHub.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
c.ConfigurableHTTPProxy.command = [
    str(Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "configurable-http-proxy")
]
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{int(os.environ.get('SPE_HUB_PROXY_API_PORT', '8001'))}")
c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")
c.JupyterHub.cleanup_servers = True

# Keycloak (real OIDC code flow with PKCE); only `researcher` principals get in.
c.JupyterHub.authenticator_class = SPEKeycloakAuthenticator
c.SPEKeycloakAuthenticator.client_id = "jupyterhub"
c.SPEKeycloakAuthenticator.client_secret = secret_from_env("SPE_HUB_OAUTH_CLIENT_SECRET")
c.SPEKeycloakAuthenticator.oauth_callback_url = f"{public}/hub/oauth_callback"
c.SPEKeycloakAuthenticator.authorize_url = f"{realm}/auth"
c.SPEKeycloakAuthenticator.token_url = f"{realm}/token"
c.SPEKeycloakAuthenticator.userdata_url = f"{realm}/userinfo"
c.SPEKeycloakAuthenticator.end_session_url = f"{realm}/logout"
c.SPEKeycloakAuthenticator.post_logout_url = f"{public}/hub/login"
c.SPEKeycloakAuthenticator.scope = ["openid", "profile"]
c.SPEKeycloakAuthenticator.username_claim = "preferred_username"
c.SPEKeycloakAuthenticator.login_service = "SPE (Keycloak)"
c.SPEKeycloakAuthenticator.enable_pkce = True
c.SPEKeycloakAuthenticator.enable_auth_state = True
c.SPEKeycloakAuthenticator.auth_refresh_age = 300
c.SPEKeycloakAuthenticator.refresh_pre_spawn = True
c.SPEKeycloakAuthenticator.manage_groups = False
c.SPEKeycloakAuthenticator.allow_all = False
c.SPEKeycloakAuthenticator.allow_existing_users = False

# One named server per (researcher, permit): the server name is the permit id.
c.JupyterHub.spawner_class = SandboxSpawner
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 0
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
c.Spawner.default_url = "/lab"
c.Spawner.env_keep = []  # nothing of the hub's environment enters a workspace
# JupyterLab plugins whose commands move files out through the browser: Download and Copy
# Download Link (file browser, documents) and Export Notebook As (nbconvert). Hidden here, for
# the researcher's sake only: the browser gate refuses their routes whatever the server says.
# The news announcements are off too: a workspace has no Internet, so the prompt to fetch
# news could only fail.
HIDDEN_LAB_PLUGINS = ("@jupyterlab/docmanager-extension:download",
                      "@jupyterlab/filebrowser-extension:download",
                      "@jupyterlab/notebook-extension:export",
                      "@jupyterlab/apputils-extension:announcements")
server_tornado_settings = {
    "headers": {"Content-Security-Policy":
                "frame-ancestors 'self'; report-uri /api/security/csp-report",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"},
}
# JupyterLab reads disabled plugins from page_config.json in its config path, which includes
# the runtime's etc/jupyter (the runtime is root-owned and read-only in every sandbox).
labconfig = ws.runtime_dir.resolve() / "etc" / "jupyter" / "labconfig"
if labconfig.parent.parent.parent.is_dir():
    labconfig.mkdir(mode=0o755, parents=True, exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": dict.fromkeys(HIDDEN_LAB_PLUGINS, True)}, indent=1) + "\n")
    (labconfig / "page_config.json").chmod(0o644)
c.Spawner.args = [
    # no third-party frames, no extension installs from the browser, no terminals escaping
    # the kernel's view (they would run in the same sandbox anyway)
    f"--ServerApp.tornado_settings={server_tornado_settings!r}",  # a Python literal
    "--LabApp.extension_manager=readonly",
]

# Cookie hardening (DESIGN §11): hub cookies are HttpOnly, SameSite=Strict (the browser never
# sends them on cross-site requests), Secure under https; JupyterHub passes these options to
# every user server (JUPYTERHUB_COOKIE_OPTIONS), where the spawner relaxes SameSite to Lax: a
# workspace is on a site of its own, opened from the hub by a cross-site navigation
# (workspaces.spawner.server_cookie_options). Cookie-authenticated API
# requests need the XSRF token (JupyterHub >= 4.1). User servers are on their own origins
# (above), so a workspace page never sees the hub's cookies.
cookie_options = {"SameSite": "Strict", "HttpOnly": True}
if secure:
    cookie_options["Secure"] = True
    c.JupyterHub.cookie_host_prefix_enabled = True
c.JupyterHub.tornado_settings = {"cookie_options": cookie_options,
                                 "headers": {"X-Frame-Options": "SAMEORIGIN"}}
c.JupyterHub.cookie_max_age_days = 0.5

# Hub-side service: permit events -> stop servers, idle culling (Ray-aware), retention.
service_env = {k: v for k, v in os.environ.items()
               if k.startswith(("SPE_", "PYTHONPATH")) and k != "SPE_HUB_CRYPT_KEY"
               and k != "SPE_HUB_OAUTH_CLIENT_SECRET"}
c.JupyterHub.services = [{
    "name": "spe-workspaces",
    "command": [sys.executable, "-m", "workspaces.hub_service"],
    "environment": service_env,
    "cwd": str(Path(__file__).resolve().parents[2]),
}, {
    # The public listener: hub on its host, each workspace on its own origin, download routes
    # refused, responses counted against the browser byte budget (workspaces.browser_gate).
    "name": "spe-browser-gate",
    "command": [sys.executable, "-m", "workspaces.browser_gate"],
    "environment": {**service_env, "SPE_GATE_LISTEN": public,
                    "SPE_GATE_UPSTREAM": f"http://127.0.0.1:{proxy_port}",
                    "SPE_GATE_HUB_HOST": parsed_public.hostname or "127.0.0.1",
                    "SPE_GATE_USER_DOMAIN": user_domain},
    "cwd": str(Path(__file__).resolve().parents[2]),
}]
c.JupyterHub.load_roles = [{
    "name": "spe-workspaces",
    "scopes": ["list:users", "read:users", "read:servers", "delete:servers",
               "read:users:activity"],
    "services": ["spe-workspaces"],
}, {
    # pauses a workspace whose browser byte budget is spent (stops its server)
    "name": "spe-browser-gate",
    "scopes": ["read:servers", "delete:servers"],
    "services": ["spe-browser-gate"],
}]
