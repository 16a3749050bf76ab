"""launch/compare_runs.py against a real MLflow sqlite store written by our tracker."""

import subprocess
import sys

import pytest
from conftest import ROOT, checkout_env, ok

from dist_lm.train.tracking import MlflowTracker


def test_table_and_plot_from_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name, lr, losses in (("lr-small", 1e-4, [9.0, 8.0, 7.5]), ("lr-big", 1e-3, [9.0, 6.0, 4.0])):
        tracker = MlflowTracker(uri, "cmp", name)
        tracker.log_params({"optim.lr": lr, "model.d_model": 64})
        for step, loss in enumerate(losses, 1):
            tracker.log_metrics({"train/loss": loss}, step=step)
        tracker.log_metrics({"val/loss": losses[-1] + 0.1, "perf/tokens_per_s": 1234.0}, step=3)
        tracker.close()
    png = tmp_path / "losses.png"
    proc = ok(subprocess.run([sys.executable, str(ROOT / "launch" / "compare_runs.py"), "--experiment", "cmp",
                              "--tracking-uri", uri, "--plot", str(png)], capture_output=True, text=True,
                             timeout=120, env=checkout_env()))
    lines = proc.stdout.splitlines()
    assert "optim.lr" in lines[0] and "model.d_model" not in lines[0]  # only the params that differ
    big = next(line for line in lines if line.startswith("lr-big"))
    assert "0.001" in big and "4.0000" in big and "4.1000" in big and "1,234" in big
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "compare_runs.py"), "--experiment", "nope",
                           "--tracking-uri", uri], capture_output=True, text=True, timeout=120,
                          env=checkout_env())
    assert proc.returncode == 2 and "no MLflow experiment 'nope'" in proc.stderr and "cmp" in proc.stderr


def test_plot_to_an_unknown_format_is_a_user_error(tmp_path):
    from dist_lm.errors import UserError
    from dist_lm.train.compare import plot_losses

    with pytest.raises(UserError, match=r"losses\.xyz.*\.png"):
        plot_losses([], tmp_path / "losses.xyz")
    assert not (tmp_path / "losses.xyz").exists()
