"""A private Ray head inside a workspace sandbox runs a task on the workspace's allocated GPU.

There is no GPU on the test machines: the allocator hands out a configured index and Ray's
*logical* GPU stands in for it (``--num-gpus``; no device node is bound because none exists).
The test checks what Ray reports, that the task ran as the workspace account inside the
sandbox, that token authentication is on, and that a second workspace gets the only GPU only
after the first released it. One Ray head (~1 GB, ~10 s): kept to a single test.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import uuid
from pathlib import Path

import pytest

from permits.terms import ComputeQuota
from spe.db import Database
from workspaces import gpu, runtime
from workspaces.errors import GpuUnavailable
from workspaces.ray_head import ray_env, write_token
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

RUNTIME = Path(os.environ.get("SPE_WS_RUNTIME_DIR", runtime.ROOT / "var" / "runtime"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("bwrap"),
                       reason="the sandbox needs root and bubblewrap"),
    pytest.mark.skipif(not (RUNTIME / "bin" / "ray").exists(),
                       reason="workspace runtime not built (python -m workspaces.runtime build)"),
]

DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys, ray
    from spe import client
    client.ray()  # starts the workspace's private head and connects this driver
    # Token auth is on: a client with a wrong token is refused.
    bad = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print('CONNECTED')"],
                         env={**os.environ, "RAY_AUTH_TOKEN": "0" * 64}, capture_output=True,
                         text=True, timeout=60)
    @ray.remote(num_gpus=1)
    def on_gpu():
        return {"gpu_ids": ray.get_gpu_ids(), "uid": os.getuid(),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    out = ray.get(on_gpu.remote())
    out["resources"] = ray.cluster_resources()
    out["bad_client_connected"] = "CONNECTED" in bad.stdout
    print("RESULT " + json.dumps(out))
""")


def test_ray_task_on_allocated_gpu_one_workspace_at_a_time(sqlite_db: Database,
                                                           tmp_path: Path) -> None:
    settings = WorkspaceSettings(runtime_dir=RUNTIME, gpu_indices=(0,),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    quota = ComputeQuota(gpus=1, cpus=1, memory_mb=3072)
    ws_a = f"t{uuid.uuid4().hex[:11]}"
    gpus = gpu.allocate(sqlite_db, workspace_id=ws_a, permit_id="P-A", person="alice",
                        count=quota.gpus, settings=settings)
    assert gpus == (0,)
    ws = Workspace.provision(workspaces_dir=tmp_path / "workspaces", person="alice",
                             permit_id="P-A", quota=quota, settings=settings,
                             with_network=False, env=ray_env(quota, gpus), ws_id=ws_a,
                             devices=gpu.device_nodes(gpus))
    try:
        write_token(ws.spec.home, ws.account.uid, ws.account.gid)
        run = ws.run(["python", "-c", DRIVER], timeout=240)
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, run.stdout + run.stderr
        out = json.loads(line[len("RESULT "):])
        assert out["gpu_ids"] == [0] or out["gpu_ids"] == ["0"]
        assert out["uid"] == ws.account.uid
        assert out["resources"]["GPU"] == 1.0 and out["resources"]["CPU"] == 1.0
        assert out["resources"]["object_store_memory"] == pytest.approx(768 * 1024 * 1024,
                                                                       rel=0.01)
        assert out["bad_client_connected"] is False
        # The only GPU is held: a second workspace must wait for it.
        with pytest.raises(GpuUnavailable):
            gpu.allocate(sqlite_db, workspace_id="other", permit_id="P-B", person="bob",
                         count=1, settings=settings)
    finally:
        ws.destroy(remove_home=True)
        gpu.release(sqlite_db, ws_a)
    assert gpu.allocate(sqlite_db, workspace_id="other", permit_id="P-B", person="bob",
                        count=1, settings=settings) == (0,)
