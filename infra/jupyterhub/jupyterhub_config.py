"""JupyterHub for the SPE: Keycloak login (researchers only), one sandboxed server per permit.

Read from the environment (``spe up`` sets them):
  SPE_HUB_OAUTH_CLIENT_SECRET   secret of the confidential Keycloak client ``jupyterhub``
  SPE_HUB_CRYPT_KEY             32-byte hex key encrypting auth state (JUPYTERHUB_CRYPT_KEY)
  SPE_KEYCLOAK_URL / SPE_KEYCLOAK_REALM, SPE_HUB_PUBLIC_URL (default http://127.0.0.1:8000)
Everything else comes from spe.config / workspaces.settings.
"""

import os
from pathlib import Path

from spe.config import get_settings
from workspaces.settings import get_workspace_settings
from workspaces.spawner import SandboxSpawner

c = get_config()  # type: ignore[name-defined]  # noqa: F821 - provided by JupyterHub

spe = get_settings()
ws = get_workspace_settings()
hub_dir = spe.data_dir / "hub"
hub_dir.mkdir(parents=True, exist_ok=True)
hub_dir.chmod(0o700)
public = os.environ.get("SPE_HUB_PUBLIC_URL", "http://127.0.0.1:8000")
realm = f"{spe.keycloak_base_url}/realms/{spe.keycloak_realm}/protocol/openid-connect"

# Hub, proxy, state: loopback only; secrets in the 0700 hub dir, never in a workspace.
c.JupyterHub.bind_url = public
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = ws.allowed_host_ports[0]
c.JupyterHub.cookie_secret_file = str(hub_dir / "jupyterhub_cookie_secret")
c.JupyterHub.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
c.ConfigurableHTTPProxy.command = [
    str(Path(__file__).resolve().parents[2] / "node_modules" / ".bin" / "configurable-http-proxy")
]
c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")

# Keycloak (real OIDC code flow with PKCE); only `researcher` principals get in.
c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.client_id = "jupyterhub"
c.GenericOAuthenticator.client_secret = os.environ.get("SPE_HUB_OAUTH_CLIENT_SECRET", "")
c.GenericOAuthenticator.oauth_callback_url = f"{public}/hub/oauth_callback"
c.GenericOAuthenticator.authorize_url = f"{realm}/auth"
c.GenericOAuthenticator.token_url = f"{realm}/token"
c.GenericOAuthenticator.userdata_url = f"{realm}/userinfo"
c.GenericOAuthenticator.logout_redirect_url = (
    f"{realm}/logout?client_id=jupyterhub&post_logout_redirect_uri={public}/hub/login")
c.GenericOAuthenticator.scope = ["openid", "profile", "roles"]
c.GenericOAuthenticator.username_claim = "preferred_username"
c.GenericOAuthenticator.enable_pkce = True
c.GenericOAuthenticator.enable_auth_state = True
c.GenericOAuthenticator.auth_refresh_age = 300
c.GenericOAuthenticator.refresh_pre_spawn = True
c.GenericOAuthenticator.manage_groups = False
c.GenericOAuthenticator.claim_groups_key = lambda user: (
    user.get("realm_access", {}).get("roles") or user.get("roles") or [])
c.GenericOAuthenticator.allowed_groups = {"researcher"}
if os.environ.get("SPE_HUB_CRYPT_KEY"):
    os.environ.setdefault("JUPYTERHUB_CRYPT_KEY", os.environ["SPE_HUB_CRYPT_KEY"])

# One named server per (researcher, permit): the server name is the permit id.
c.JupyterHub.spawner_class = SandboxSpawner
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 0
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
c.Spawner.default_url = "/lab"
c.Spawner.env_keep = []  # nothing of the hub's environment enters a workspace
c.JupyterHub.tornado_settings = {"cookie_options": {"SameSite": "Strict", "HttpOnly": True}}
