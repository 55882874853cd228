"""End to end: the reduced reproduction study in smoke mode trains real variants and writes its report."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_reproduce_smoke_writes_report_and_images(tmp_path):
    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "tools/reproduce.py", "--smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = (out / "report.md").read_text()
    for heading in ("## Findings", "## Main comparison", "## Figures"):
        assert heading in report
    for variant in ("SM+LN+G", "EReg(SM(t)+ScFuFFN)"):
        assert f"| {variant} |" in report
    images = sorted((out / "figures").glob("*.png"))
    assert {p.name for p in images} >= {"entropy_bins.png", "heatmap_sm_ln_g.png", "heatmap_ereg_sm_t_scfuffn.png"}
    for image in images:
        assert f"({image.relative_to(out)})" in report  # linked from the report
        with Image.open(image) as png:
            assert png.format == "PNG" and png.size[0] > 100
    assert "**not tested**" in report  # smoke has no SM run: the collapse and overload findings say so
    for run in ("sm_ln_g_seed1", "ereg_sm_t_scfuffn_seed1"):
        assert (out / "runs" / run / "metrics.jsonl").stat().st_size > 0

    # a study cut short: --report-only reports the finished runs and names the missing one
    (out / "runs" / "sm_ln_g_seed1" / "study_run.json").unlink()
    again = subprocess.run([sys.executable, "tools/reproduce.py", "--smoke", "--report-only", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    partial = (out / "report.md").read_text()
    assert "**Incomplete: 1 of 2 planned runs finished**; not run: sm_ln_g_seed1." in partial
    assert "| EReg(SM(t)+ScFuFFN) |" in partial and "| SM+LN+G |" not in partial


def test_reproduce_rejects_bad_input_without_writing(tmp_path):
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, "tools/reproduce.py", "--smoke", "--variants", "NOPE", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()
