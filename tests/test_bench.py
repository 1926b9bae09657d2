"""bench.py runs at a tiny size (speed and memory are measured there, never asserted here)."""
import bench


def test_sample_benchmark_runs(capsys):
    bench.main(["sample", "--model", "tiny-random", "--batch", "4", "--questions", "2", "--new-tokens", "4",
                "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| batch | plain generate tok/s |" in out and "\n| 4 |" in out


def test_train_benchmark_runs(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "trl", None)  # our side only: TRL is an optional extra
    bench.main(["train", "--model", "tiny-random", "--pairs", "4", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| ours |" in out and "TRL" not in out.split("|---")[1]
