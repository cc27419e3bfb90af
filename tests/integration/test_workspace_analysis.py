"""A researcher's first analysis runs in a real sandboxed kernel (issue 15).

Tried as a new user would, the first plot in a new notebook failed: the workspace runtime had no
matplotlib. Here each kernel a researcher can pick is started the way JupyterLab starts it
(``jupyter_client`` with the kernel's own spec), inside a real bubblewrap sandbox (own Unix user,
seccomp filter, cgroup, network namespace) on the workspace runtime, and runs a small analysis:

- Python: a Kaplan-Meier plot saved to a PNG in the home, a Cox model fitted with lifelines
  whose coefficients recover the simulated effects, an OLS with statsmodels, a logistic
  regression with scikit-learn and a test with scipy; and the ``%%dp`` magic is already loaded
  (the runtime's IPython configuration), without ``%load_ext``;
- R (Debian's R with IRkernel, where installed): a data frame summarised.

Needs root, bubblewrap, nftables, iproute2 and the workspace runtime built by set-up
(``python -m workspaces.runtime build var/runtime``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from permits.terms import ComputeQuota
from workspaces import runtime
from workspaces.errors import StaleRuntime
from workspaces.sandbox import Workspace
from workspaces.settings import WorkspaceSettings

RUNTIME = runtime.ROOT / "var" / "runtime"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("bwrap", "nft", "ip", "setpriv")),
        reason="the sandbox needs root, bubblewrap, nftables, iproute2 and setpriv"),
    pytest.mark.skipif(not (RUNTIME / ".spe-runtime").is_file(),
                       reason="no workspace runtime (python -m workspaces.runtime build "
                              "var/runtime, run by scripts/setup.sh)"),
]


@pytest.fixture(scope="module", autouse=True)
def current_runtime() -> None:
    """The project's code as it is now in the runtime, as the spawner does before a start."""
    try:
        runtime.ensure_current(RUNTIME)
    except StaleRuntime as exc:
        pytest.skip(str(exc))

#: Run inside the sandbox by the runtime's Python: starts a kernel from its spec, as JupyterLab
#: does, runs one cell and prints what the cell showed.
DRIVER = textwrap.dedent("""
    import json, sys
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel
    name, code = json.loads(sys.argv[1])
    specs = sorted(KernelSpecManager().find_kernel_specs())
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    out = []
    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", "") + "\\n")
        elif kind == "error":
            out.append("ERROR " + content["ename"] + ": " + content["evalue"] + "\\n")
    try:
        reply = kc.execute_interactive(code, output_hook=hook, timeout=300)
        status = reply["content"]["status"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps({"specs": specs, "status": status, "output": "".join(out)}))
""")

PYTHON_ANALYSIS = textwrap.dedent("""
    import json
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import scipy.stats
    import sklearn.linear_model
    import statsmodels.api as sm
    from lifelines import CoxPHFitter, KaplanMeierFitter

    rng = np.random.default_rng(15)
    n = 600
    age = rng.normal(60, 10, n)
    treated = rng.integers(0, 2, n)
    hazard = 0.05 * np.exp(0.04 * (age - 60) - 0.7 * treated)
    time = rng.exponential(1 / hazard)
    event = (time < 30).astype(int)
    df = pd.DataFrame({"age": age, "treated": treated, "time": np.minimum(time, 30),
                       "event": event})

    cph = CoxPHFitter().fit(df, duration_col="time", event_col="event")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for group, rows in df.groupby("treated"):
        KaplanMeierFitter().fit(rows["time"], rows["event"], label=f"treated={group}") \\
            .plot_survival_function(ax=ax)
    ax.set_xlabel("days")
    fig.savefig("km.png", dpi=80)

    ols = sm.OLS(df["time"], sm.add_constant(df[["age", "treated"]])).fit()
    logit = sklearn.linear_model.LogisticRegression().fit(df[["age", "treated"]], df["event"])
    ttest = scipy.stats.ttest_ind(df.loc[df.treated == 1, "time"],
                                  df.loc[df.treated == 0, "time"])
    print("RESULT " + json.dumps({
        "cox": cph.params_.to_dict(),
        "ols_treated": float(ols.params["treated"]),
        "logit_treated": float(logit.coef_[0][1]),
        "ttest_p": float(ttest.pvalue),
        "dp_magic": {"dp", "spe_sql"} <= set(get_ipython().magics_manager.magics["cell"]),
    }))
""")

R_ANALYSIS = textwrap.dedent("""
    df <- data.frame(age = c(34, 51, 67, 45, 72, 58),
                     sex = factor(c("F", "M", "F", "F", "M", "M")))
    by_sex <- aggregate(age ~ sex, data = df, FUN = mean)
    cat("MEAN", mean(df$age), "\\n")
    cat("BYSEX", paste(by_sex$sex, by_sex$age), "\\n")
    print(summary(df))
""")


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    settings = WorkspaceSettings(runtime_dir=RUNTIME, allowed_host_ports=(port,),
                                 cgroup_parent=f"spe-test-{uuid.uuid4().hex[:6]}")
    ws = Workspace.provision(
        workspaces_dir=tmp_path / "var" / "workspaces", person="analyst", permit_id="P-15",
        quota=ComputeQuota(cpus=1.0, memory_mb=1536), settings=settings,
        ws_id=f"t{uuid.uuid4().hex[:11]}")
    try:
        yield ws
    finally:
        ws.destroy(remove_home=True)


def run_cell(ws: Workspace, kernel: str, code: str) -> dict[str, Any]:
    proc = ws.run([str(RUNTIME.resolve() / "bin" / "python"), "-c", DRIVER,
                   json.dumps([kernel, code])], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _result_line(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    parsed: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return parsed


def test_python_kernel_plots_and_fits_a_cox_model(workspace: Workspace) -> None:
    result = run_cell(workspace, "python3", PYTHON_ANALYSIS)
    assert result["status"] == "ok", result["output"][-3000:]
    found = _result_line(result["output"])

    # The Cox model recovers the simulated log hazard ratios (age +0.04/year, treatment -0.7).
    assert 0.02 < found["cox"]["age"] < 0.06
    assert -1.0 < found["cox"]["treated"] < -0.4
    assert found["logit_treated"] < 0  # treated patients have fewer events within 30 days
    assert found["ols_treated"] > 0 and found["ttest_p"] < 0.05  # ... and longer times
    # The %%dp magic is there in a new kernel, without %load_ext.
    assert found["dp_magic"] is True

    # The plot was written by the workspace's own user into its home.
    png = workspace.spec.home / "km.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5_000
    assert png.stat().st_uid == workspace.account.uid


def test_ipython_loads_the_dp_magic(workspace: Workspace) -> None:
    """Terminal IPython in the workspace (e.g. a JupyterLab terminal) loads it too."""
    ipython = str(RUNTIME.resolve() / "bin" / "ipython")
    # --quick skips every configuration file: the control shows the magic comes from the
    # runtime's configuration, not from IPython itself.
    code = "print('DP' if 'dp' in get_ipython().magics_manager.magics['cell'] else 'NONE')"
    with_config = workspace.run([ipython, "--no-banner", "-c", code], timeout=120)
    without = workspace.run([ipython, "--no-banner", "--quick", "-c", code], timeout=120)
    assert with_config.stdout.split()[-1:] == ["DP"], with_config.stderr[-2000:]
    assert without.stdout.split()[-1:] == ["NONE"], without.stderr[-2000:]


@pytest.mark.skipif(not Path("/usr/share/jupyter/kernels/ir/kernel.json").exists(),
                    reason="no R kernel (Debian's r-cran-irkernel; scripts/setup.sh installs it)")
def test_r_kernel_summarises_a_data_frame(workspace: Workspace) -> None:
    result = run_cell(workspace, "ir", R_ANALYSIS)
    assert "ir" in result["specs"] and "python3" in result["specs"]
    assert result["status"] == "ok", result["output"][-3000:]
    out = result["output"]
    assert "MEAN 54.5" in out
    assert "BYSEX F 48.6666666666667 M 60.3333333333333" in out
    assert "Median :54.5" in out  # summary() of the data frame
