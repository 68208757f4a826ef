"""The run report from the training callback (refreshed every `report_every` checks and at
train end, through the spool) and the `gradwatch report` / `gradwatch dashboard` commands, all
against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gradwatch import ConfigError, GradWatch
from tests.support.dashboard_runs import EVIL_LAYER, a_run_with_everything
from tests.support.mlflow_server import MlflowServer
from tests.watch.test_callback_loop import loss_fn, train


def gradwatch_cli(*args: str, server: MlflowServer, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_callback_logs_the_report_during_training_and_at_the_end(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment = f"report-{tmp_path.name}"
    versions: list[str] = []

    def on_step(step: int, watch: GradWatch) -> None:
        if step == 12:  # after the 3rd check (1, 5, 10): one refresh was asked for at the 2nd
            watch.recorder.flush(timeout=60)  # type: ignore[attr-defined]
            versions.append(_report_text(client, str(watch.run_id)))

    watch = GradWatch(every=5, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                      experiment_name=experiment, spool_dir=tmp_path / "spool", budget=300,
                      report_every=2)
    train(watch, 20, wrong_between=(8, 13), on_step=lambda step: on_step(step, watch))
    final = _report_text(client, str(watch.run_id))
    # the mid-training report saw the checks at steps 1 and 5; the final one all five
    assert '"step":5' in versions[0] and '"step":10' not in versions[0]
    for step in (1, 5, 10, 15, 20):
        assert f'"step":{step}' in final
    assert watch.run_id in final and "3.weight" in final
    run = client.get_run(str(watch.run_id))
    assert run.info.status == "FINISHED" and "gradwatch.report" not in run.data.params
    paths = [a.path for a in client.list_artifacts(str(watch.run_id), "gradwatch")]
    assert "gradwatch/report.png" in paths  # the final report also as a picture


def test_report_false_logs_no_report_and_report_every_is_checked(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    watch = GradWatch(every=5, loss_fn=loss_fn, tracking_uri=mlflow_server.url,
                      experiment_name=f"noreport-{tmp_path.name}", spool_dir=tmp_path / "s",
                      budget=300, report=False)
    train(watch, 10)
    client = MlflowClient(mlflow_server.url)
    paths = [a.path for a in client.list_artifacts(str(watch.run_id), "gradwatch")]
    assert "gradwatch/report.html" not in paths and "gradwatch/checks" in paths
    assert "gradwatch/report.png" not in paths
    with pytest.raises(ConfigError, match="report_every must be an int ≥ 1"):
        GradWatch(report_every=0)


def test_gradwatch_report_and_dashboard_commands(mlflow_server: MlflowServer,
                                                 tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment_id, run_id = a_run_with_everything(client)
    done = gradwatch_cli("report", run_id, "-o", "r.html", "--png", "r.png",
                         server=mlflow_server, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert result["bytes"] == len(page.encode()) and run_id in page
    assert EVIL_LAYER not in page  # escaped
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = gradwatch_cli("report", run_id, "--log", server=mlflow_server, cwd=tmp_path)
    assert logged.returncode == 0, logged.stderr
    assert json.loads(logged.stdout)["artifacts"] == ["gradwatch/report.html"]
    assert run_id in _report_text(client, run_id)

    name = client.get_experiment(experiment_id).name
    board = gradwatch_cli("dashboard", "--experiment", name, "-o", "out/board.html",
                          server=mlflow_server, cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    html = (tmp_path / "out" / "board.html").read_text(encoding="utf-8")
    assert f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run_id}" in html
    missing = gradwatch_cli("dashboard", "--experiment", "no-such-experiment-x", "-o", "x.html",
                            server=mlflow_server, cwd=tmp_path)
    assert missing.returncode == 2 and "no-such-experiment-x" in missing.stderr
    assert not (tmp_path / "x.html").exists()


def test_gradwatch_flush_builds_the_report_a_spool_left_behind(mlflow_server: MlflowServer,
                                                               tmp_path: Path) -> None:
    """A run report asked for while the server was down is built by `gradwatch flush` (the
    record writer cannot build it: the command hands it the dashboard's builder)."""
    from gradwatch.record.spool import Spool
    from gradwatch.record.writer import report_payload

    client = MlflowClient(mlflow_server.url)
    _, run_id = a_run_with_everything(client)
    with Spool(tmp_path / "spool" / run_id, deliver=print) as spool:  # never started
        spool.append(report_payload(run_id=run_id, tracking_uri=mlflow_server.url))
    done = gradwatch_cli("flush", "--spool-dir", str(tmp_path / "spool"),
                         server=mlflow_server, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("delivered 1 record from 1 run")
    assert run_id in _report_text(client, run_id)


def _report_text(client: MlflowClient, run_id: str) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run_id, "gradwatch/report.html", folder)
        return Path(path).read_text(encoding="utf-8")
