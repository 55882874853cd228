"""analysis/pi_measured.py (stage inventory, fit, estimate) and tools/pi_cost.py --measured."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_entropy.analysis import pi_cost, pi_measured
from megatron_entropy.model.variants import VARIANTS
from tests.conftest import REPO


@pytest.mark.parametrize("variant", ["SM+LN+G", "SM+LN+R", "SM+ScFuFFN", "EReg(SM(t)+ScFuFFN)", "SM+ScFFN"])
def test_inventory_has_the_papers_nonlinear_elements(variant):
    shape = pi_cost.Shape(num_layers=3, num_heads=4, hidden_size=32, seq_length=16, ffn_hidden_size=128)
    spec = VARIANTS[variant]
    ops = pi_measured.op_inventory(pi_cost.measured_arch(spec, shape, 100), shape.seq_length)
    elements = {}
    for op in ops:
        if "rows" in op.dims:
            elements[op.op_class] = elements.get(op.op_class, 0) + op.dims["batch"] * op.dims["rows"] * op.dims["width"]
    counted = pi_cost.nonlinear_ops(spec, shape).elements
    for part in ("softmax_max", "softmax_exp", "softmax_normalize"):
        assert elements[part] == counted["softmax"]
    final = 32 if spec.final_norm else 0  # ln_f on the last position only (the paper never counts it)
    assert elements.get("layernorm", 0) == counted["layernorm"] + final
    assert elements.get("gelu", 0) == counted["gelu"] and elements.get("relu", 0) == counted["relu"]
    assert ("temperature" in elements) == spec.learnable_temperature
    assert ops[0].op_class == "embedding" and ops[-1].op_class == "head"


def test_fit_recovers_known_costs_and_estimate_sums_them():
    rng = np.random.default_rng(0)
    truth = {"matmul": {"mk": 3.0, "kn": 5.0, "mn": 7.0, "calls": 1000.0}, "gelu": {"elements": 40.0, "calls": 50.0}}
    rows = []
    for _ in range(30):
        m, k, n = rng.integers(2, 200, 3)
        rows.append({"op_class": "linear", "dims": dict(batch=1, m=m, k=k, n=n),
                     "bytes": 3 * m * k + 5 * k * n + 7 * m * n + 1000, "actions": 4, "seconds": 0.1})
        r, w = rng.integers(2, 100, 2)
        rows.append({"op_class": "gelu", "dims": dict(batch=1, rows=r, width=w), "bytes": 40 * r * w + 50,
                     "actions": 9, "seconds": 0.2})
    model = pi_measured.fit(rows)
    for key, coefs in truth.items():
        for name, value in coefs.items():
            assert model[key]["bytes"][name] == pytest.approx(value, rel=1e-6)
    est = pi_measured.stage_estimate(model, "gelu", dict(batch=1, rows=10, width=10))
    assert est["bytes"] == pytest.approx(4050) and est["actions"] == pytest.approx(9)
    assert pi_measured.latency(1e6, 10, 1.0, 8e6, 0.1) == pytest.approx(3.0)


def test_pi_cost_measured_mode_uses_the_committed_coefficients():
    out = subprocess.run([sys.executable, "tools/pi_cost.py", "paper/table3/sm_ln_g", "--variants", "SM+LN+G",
                          "SM+ScFuFFN", "--measured", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mode"] == "measured"
    base, fused = data["configs"][0]["rows"]
    assert base["comm_gb_est"] > fused["comm_gb_est"] > 0 and fused["comm_saving"] > 1
    assert len(data["fit"]["rows"]) == len(pi_cost.PUBLISHED) + len(pi_cost.HELD_OUT)
    bad = subprocess.run([sys.executable, "tools/pi_cost.py", "tiny", "--measured", "/nonexistent.json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
