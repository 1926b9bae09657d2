"""plot.py draws a PNG per run directory from metrics.jsonl and eval.json."""
import pytest

from machinery import files, results
from tools import plot


def test_plots_of_rpo_and_sdpo_runs(full_run, two_steps, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, _ = full_run
    cfg, _ = two_steps
    plot.main([str(out), cfg.out, "--out", str(tmp_path)])
    for name in (out.name, "run"):
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_runs_together(full_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, _ = full_run
    plot.main(["--together", str(out), str(out), "--first", "1", "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert table.count(f"| {out.name} | 1 | 4 |") == 2 and f"| {out.name} | 2 |" not in table


def test_sdpo_runs_together_give_gamma_ref_by_file(two_steps, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg, _ = two_steps
    plot.main(["--together", cfg.out, "--out", str(tmp_path / "sdpo.png")])
    table = capsys.readouterr().out
    for t in (1, 2):
        gamma = [r["chosen"] - r["rejected"] for r in files.read(f"{cfg.out}/step_{t}/reference.jsonl")]
        assert f"| p.jsonl: {sum(gamma) / len(gamma):.2f} ({len(gamma)}) |" in table


def test_sign_test():
    assert results.sign_test(0, 0) == 1.0
    assert results.sign_test(0, 5) == pytest.approx(2 / 32)  # 5 gained, none lost: 2 · (1/2)^5
    assert results.sign_test(3, 3) == 1.0
    assert results.sign_test(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_unfinished_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="not a finished run directory"):
        plot.main([str(tmp_path)])
