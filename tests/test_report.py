"""report.py writes one self-contained HTML page per run directory; a real browser (headless Chromium) renders it."""
import shutil
import subprocess

import pytest

from tools import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_report_of_an_rpo_and_an_sdpo_run(full_run, two_steps, tmp_path):
    out, _ = full_run
    cfg, _ = two_steps
    for folder, unit in ((out, "iteration"), (cfg.out, "step")):
        copy = tmp_path / unit
        shutil.copytree(folder, copy)
        page = open(report.report(str(copy), sample=3), encoding="utf-8").read()
        assert f"<th>{unit}</th>" in page and "vs M_0: gained / lost (sign test)" in page
        assert page.count("<details") == 3 * 2  # 3 pairs of each of two iterations (steps)
        assert "http://" not in page and "https://" not in page and "src=\"data:image/png;base64," in page
    rpo_page = open(tmp_path / "iteration" / "report.html", encoding="utf-8").read()
    assert 'class="gold">' in rpo_page and "<mark>" in rpo_page  # the gold and the extracted answers highlighted


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's package chromium); .ci/run installs it")
def test_a_browser_renders_the_table_the_plots_and_a_pair(full_run, tmp_path):
    import matplotlib.image

    out, _ = full_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    url = "file://" + report.report(str(copy), sample=2)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "<table>" in dom and "<summary>pair 1" in dom and 'class="side chosen"' in dom and "<img" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(common + ["--window-size=1280,1400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1400, 1280) and pixels.std() > 0.05  # a page with text, a table and plots
