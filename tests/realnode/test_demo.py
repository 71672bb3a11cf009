"""`make demo`, the README's first command, as a user runs it: on the running cluster (the real
node is one per machine), with the operator installed by the chart as a pod."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from localcluster import Cluster
from support import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]


def test_make_demo_answers_from_a_real_pod_and_promotes_a_canary(
    cluster: Cluster, chart_operator: None
) -> None:
    try:
        demo = subprocess.run(
            ["make", "--no-print-directory", "-C", str(ROOT), "demo", f"PYTHON={sys.executable}"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        out = demo.stdout
        assert demo.returncode == 0, out[-3000:] + demo.stderr[-3000:]
        assert "modeldeployment.serving.modeldeploy.io/iris condition met" in out
        pods = out.split("$ kubectl get pods -n demo -o wide", 1)[1].splitlines()
        assert all(line.split()[1] == "2/2" for line in pods[2:4]), pods[:4]
        assert all(" real-0 " in line for line in pods[2:4]), pods[:4]
        # Version 1's answer, then version 2's after the canary was promoted.
        answers = re.findall(r"versicolor-like .* -> versicolor \(.*versicolor (0\.\d+)", out)
        assert answers == ["0.838", "0.888"], answers
        assert "[demo] version 2 was promoted" in out
        assert "analysis errors" in out  # the canary was judged on the sidecars' metrics
        assert re.search(r"==> make demo: done in \d+s", out)
    finally:
        cluster.kubectl("delete", "namespace", "demo", "--wait=false", check=False)
        cluster.kubectl("delete", "pv", "model-store-demo", "--wait=false", check=False)
