"""The cluster manifests in infra/k8s validate against the Kubernetes schemas and keep the
controls the single-machine sandbox enforces (docs/cluster.md maps them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
BUILTIN = ("namespaces.yaml", "api.yaml", "postgres.yaml", "keycloak.yaml",
           "workspaces-policy.yaml")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if "template" in spec:
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"],
                *[g["template"]["spec"] for g in spec["workerGroupSpecs"]]]
    return []


@pytest.mark.parametrize("name", BUILTIN)
def test_manifests_validate_against_the_kubernetes_schemas(name: str) -> None:
    version = kubernetes_validate.latest_version()
    for doc in _docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_refused() -> None:
    """Control: the validator does reject a wrong field, so the test above can fail."""
    doc = _docs("api.yaml")[-1]  # the Service
    doc["spec"]["ports"][0]["port"] = "not-a-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", [*BUILTIN, "raycluster-workspace.yaml"])
def test_every_pod_is_non_root_without_privileges_and_limited(name: str) -> None:
    for doc in _docs(name):
        for pod in _pod_specs(doc):
            assert pod.get("automountServiceAccountToken") is False, doc["metadata"]["name"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault",
                                                                        "Localhost")
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert container["resources"]["limits"]


def test_workspaces_namespace_denies_egress_except_api_and_hub() -> None:
    policies = {d["metadata"]["name"]: d for d in _docs("workspaces-policy.yaml")
                if d["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "egress" not in deny and "ingress" not in deny
    egress = policies["workspace-egress-to-api-and-hub"]["spec"]["egress"]
    targets = {(r["to"][0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
                or r["to"][0]["podSelector"]["matchLabels"].get("component"),
                r["ports"][0]["port"]) for r in egress}
    assert targets == {("spe-api", 8000), ("hub", 8081)}
    for ns in _docs("namespaces.yaml"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_hub_values_keep_the_workspace_controls() -> None:
    values = yaml.safe_load((K8S / "jupyterhub-values.yaml").read_text())
    single = values["singleuser"]
    assert single["networkPolicy"]["egress"] == []
    assert not any(single["networkPolicy"]["egressAllowRules"].values())
    assert single["extraPodConfig"]["runtimeClassName"]
    assert single["extraPodConfig"]["securityContext"]["seccompProfile"]["type"] == "Localhost"
    assert values["hub"]["config"]["JupyterHub"]["subdomain_host"].startswith("https://")
    assert values["hub"]["config"]["GenericOAuthenticator"]["enable_pkce"] is True


def test_ray_cluster_is_per_workspace_with_the_permit_gpu_quota() -> None:
    (ray,) = _docs("raycluster-workspace.yaml")
    assert "${WORKSPACE}" in ray["metadata"]["name"]
    worker = ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "${GPUS}"


def test_docs_map_every_single_machine_control() -> None:
    text = (ROOT / "docs" / "cluster.md").read_text()
    for control in ("bubblewrap", "seccomp", "nftables", "cgroup", "loop-mounted",
                    "GPU allocator", "private Ray head", "extract", "one origin per workspace",
                    "browser gate", "retention"):
        assert control in text, control
    for name in (*BUILTIN, "jupyterhub-values.yaml", "raycluster-workspace.yaml"):
        assert f"`{name}`" in text, name
