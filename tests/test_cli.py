"""The `gradwatch` command line (run as a real subprocess) and the pytest helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradwatch
from gradwatch.testing import assert_gradients_ok
from tests.mlflow_server import MlflowServer

FACTORY = textwrap.dedent('''
    import torch

    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.T

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w, 2 * g.T @ x          # planted: dW doubled

    class Model(torch.nn.Module):
        def __init__(self, buggy):
            super().__init__()
            torch.manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(3, 4))
            self.buggy = buggy

        def forward(self, x):
            return Doubled.apply(x, self.w) if self.buggy else x @ self.w.T

    def loss(model, batch):
        return (model(batch) ** 2).mean()

    def clean():
        return Model(False), torch.randn(5, 4), loss

    def buggy():
        return {"model": Model(True), "batch": torch.randn(5, 4), "loss_fn": loss}

    def no_loss():
        return Model(False), torch.randn(5, 4)

    def crashes():
        raise RuntimeError("the factory itself fails")
''')


def gradwatch_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_check_exits_zero_when_clean_and_one_on_alert(tmp_path: Path) -> None:
    (tmp_path / "factories.py").write_text(FACTORY)
    clean = gradwatch_cli("check", "factories:clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("gradwatch check: OK")
    buggy = gradwatch_cli("check", str(tmp_path / "factories.py") + ":buggy", "--json",
                          "report.json", cwd=tmp_path)
    assert buggy.returncode == 1, buggy.stdout + buggy.stderr
    assert "ALERT" in buggy.stdout and "w " in buggy.stdout
    report = gradwatch.CheckReport.model_validate_json((tmp_path / "report.json").read_text())
    assert report.layers["w"].rel_distance == pytest.approx(1 / 3, rel=1e-6)
    missing = gradwatch_cli("check", "factories:nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "has no callable 'nothing'" in missing.stderr


@pytest.mark.parametrize("case", ["json folder", "missing file", "no module", "no loss",
                                  "crash"])
def test_check_misuse_exits_two_with_one_line_and_no_traceback(tmp_path: Path,
                                                               case: str) -> None:
    """Exit 1 means "alert" to CI: a misuse must never exit 1, nor print a traceback."""
    (tmp_path / "factories.py").write_text(FACTORY)
    arguments, expected = {
        "json folder": (["factories:clean", "--json", "/no/such/dir/x.json"],
                        "does not exist or is not writable"),
        "missing file": (["/missing/model.py:make"], "no such file: '/missing/model.py'"),
        "no module": (["nomodule_here:make"], "PYTHONPATH"),
        "no loss": (["factories:no_loss"], "return (model, batch, loss_fn) from"),
        "crash": (["factories:crashes"], "RuntimeError: the factory itself fails"),
    }[case]
    result = gradwatch_cli("check", *arguments, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "gradwatch: gradwatch" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if case == "json folder":
        assert result.stdout == ""  # refused before the check ran
    debug = gradwatch_cli("--debug", "check", *arguments, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_demo_catches_its_planted_bug(tmp_path: Path) -> None:
    env = {"GRADWATCH_SPOOL_DIR": str(tmp_path / "spool")}
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--steps", "250", "--every", "50",
         "--bug", "row", "--bug-at", "120"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**environment, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "planted bug 'row' in layer 3" in out
    before, after = out.split("planted bug")
    assert "gradwatch check: ALERT" not in before  # steps 1, 50, 100 are clean
    assert "gradwatch check: ALERT" in after
    assert "located 3.weight: row 5" in after  # localised to the planted row
    assert "[5, " in after.split("3.weight  alert")[1].splitlines()[1]
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}" in out
    run_id = out.split("MLflow run id: ")[1].split()[0]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.tags["gradwatch.alert"] == "firing"
    verdicts = client.get_metric_history(run_id, "gradwatch/verdict")
    assert [(m.step, m.value) for m in verdicts][:3] == [(1, 0.0), (50, 0.0), (100, 0.0)]
    assert max(m.value for m in verdicts) == 2.0


def test_flush_delivers_what_a_dead_server_left_behind(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from gradwatch._record import params_payload
    from gradwatch._spool import Spool

    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"flush-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id

    def unreachable(payload: dict[str, object]) -> None:
        raise ConnectionError("tracking server down")

    with Spool(tmp_path / "spool" / run_id, deliver=unreachable) as spool:
        spool.append(params_payload({"gradwatch.every": 7}, run_id=run_id,
                                    tracking_uri=mlflow_server.url))
        assert len(spool.pending()) == 1
    result = gradwatch_cli("flush", "--spool-dir", str(tmp_path / "spool"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    line = json.loads(result.stdout.splitlines()[0])
    assert line["delivered"] == 1 and line["pending"] == 0
    assert client.get_run(run_id).data.params["gradwatch.every"] == "7"


def test_assert_gradients_ok_shows_the_worst_elements() -> None:
    namespace: dict[str, object] = {}
    exec(FACTORY, namespace)
    model, batch, loss = namespace["clean"]()  # type: ignore[operator]
    assert assert_gradients_ok(model, batch, loss).verdict == "ok"
    made = namespace["buggy"]()  # type: ignore[operator]
    with pytest.raises(AssertionError, match=r"(?s)verdict alert.*w .*analytic .* vs numeric"):
        assert_gradients_ok(made["model"], made["batch"], made["loss_fn"])


@pytest.mark.parametrize("arguments,expected", [
    (["--bug-at", "50"], "--bug-at 50 needs --bug KIND"),
    (["--bug", "row", "--bug-at", "5000", "--steps", "60"], "outside the training"),
    (["--steps", "0"], "--steps must be ≥ 1"),
])
def test_demo_refuses_settings_that_would_show_nothing(tmp_path: Path, arguments: list[str],
                                                       expected: str) -> None:
    result = gradwatch_cli("demo", "--no-mlflow", *arguments, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # refused before any training


def test_demo_help_describes_it_and_its_defaults(tmp_path: Path) -> None:
    result = gradwatch_cli("demo", "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert "plant a wrong backward" in result.stdout
    assert "training steps (default: 600)" in " ".join(result.stdout.split())
    assert "seed of the model and the data (default: 0)" in " ".join(result.stdout.split())
