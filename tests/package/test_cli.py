"""The `gradwatch` command line (run as a real subprocess) and the pytest helper."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gradwatch
from gradwatch.common.progress import ProgressBar
from gradwatch.demo import run_demo
from gradwatch.testing import assert_gradients_ok
from tests.support.mlflow_server import FAIL_FAST_CLIENT_ENV, MlflowServer, free_port

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
    # stdout is a pipe, as in CI: plain lines only, a bounded number of progress lines
    assert "\r" not in out + result.stderr
    assert len([line for line in out.splitlines() if line.startswith("training [")]) <= 10
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


def _spool_with(directory: Path, *payloads: dict[str, object]) -> None:
    """A spool folder holding `payloads`, undelivered (as a dead server leaves them)."""
    from gradwatch.record.spool import Spool

    def unreachable(payload: dict[str, object]) -> None:
        raise ConnectionError("tracking server down")

    with Spool(directory, deliver=unreachable) as spool:
        for payload in payloads:
            spool.append(payload)


def test_flush_delivers_what_a_dead_server_left_behind_and_removes_its_folder(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from gradwatch.record.spool import Spool
    from gradwatch.record.writer import params_payload

    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"flush-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    root = tmp_path / "spool"
    _spool_with(root / run_id, params_payload({"gradwatch.every": 7}, run_id=run_id,
                                               tracking_uri=mlflow_server.url))
    Spool(root / "local-0123", deliver=print).close()  # an empty one, as they piled up before
    result = gradwatch_cli("flush", "--spool-dir", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "delivered 1 record from 1 run; 2 folders removed\n"
    assert result.stderr == ""
    assert client.get_run(run_id).data.params["gradwatch.every"] == "7"
    assert list(root.iterdir()) == []
    again = gradwatch_cli("flush", "--spool-dir", str(root), cwd=tmp_path)
    assert (again.returncode, again.stdout) == (0, f"nothing to flush: no spool in {root}\n")


def test_flush_keeps_what_it_cannot_deliver_says_why_and_exits_2(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from gradwatch.record.replay import peek
    from gradwatch.record.spool import REJECTED
    from gradwatch.record.writer import params_payload

    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"kept-{tmp_path.name}")).info.run_id
    client.log_param(run_id, "gradwatch.every", "5")
    root, dead = tmp_path / "spool", f"http://127.0.0.1:{free_port()}"
    down, refused = root / "run-down", root / "run-refused"
    _spool_with(down, params_payload({"gradwatch.every": 5}, run_id=run_id, tracking_uri=dead))
    journal = (down / "journal.jsonl").read_bytes()
    _spool_with(refused, params_payload({"gradwatch.every": 7}, run_id=run_id,  # changed
                                        tracking_uri=mlflow_server.url))
    result = gradwatch_cli("flush", "--spool-dir", str(root), cwd=tmp_path,
                           env=FAIL_FAST_CLIENT_ENV)
    assert result.returncode == 2, result.stdout + result.stderr
    summary, *kept = result.stdout.splitlines()
    assert summary == "delivered nothing; 0 folders removed"
    assert kept[0].startswith(f"kept {down}: 1 record not delivered (MlflowException: ")
    assert kept[1].startswith(f"kept {refused}: 1 record rejected, in {refused / REJECTED} "
                              f"(MLflow refused it: INVALID_PARAMETER_VALUE: ")
    assert len(kept) == 2
    [reason] = result.stderr.splitlines()
    assert reason.startswith("gradwatch: 1 record could not be delivered yet; it stays in ")
    assert "1 record refused by MLflow is kept in rejected.jsonl" in reason
    assert (down / "journal.jsonl").read_bytes() == journal  # intact, for the next flush
    assert peek(refused) is not None and peek(refused) == (0, 1)

    machine = gradwatch_cli("flush", "--json", "--spool-dir", str(root), cwd=tmp_path,
                            env=FAIL_FAST_CLIENT_ENV)
    assert machine.returncode == 2
    document = json.loads(machine.stdout)  # one document, not a line per folder
    assert {k: document[k] for k in ("delivered", "pending", "rejected", "removed")} == {
        "delivered": 0, "pending": 1, "rejected": 1, "removed": 0}
    assert [f["spool"] for f in document["folders"]] == [str(down), str(refused)]
    assert "INVALID_PARAMETER_VALUE" in document["folders"][1]["rejected_reason"]


def test_flush_leaves_a_running_trainings_folder_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from gradwatch.record.spool import Spool\n"
         f"spool = Spool({str(root / 'live')!r}, deliver=print)\n"
         "spool.append({'step': 1}); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
        files = {p.name: p.read_bytes() for p in (root / "live").iterdir()}
        result = gradwatch_cli("flush", "--spool-dir", str(root), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == (f"delivered nothing; 0 folders removed; 1 folder in use by a "
                                 f"running process (PID {owner.pid}), left to it\n")
        assert {p.name: p.read_bytes() for p in (root / "live").iterdir()} == files
    finally:
        owner.communicate("", timeout=30)


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


# ---------------------------------------------------------------------------- progress output
class TerminalStream(io.StringIO):
    """A stream that says it is a terminal, as sys.stdout does in an interactive shell."""

    def isatty(self) -> bool:
        return True


class ManualClock:
    """A clock the test sets: `now` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickingClock:
    """A clock that moves 0.05 s each time it is read: the demo's elapsed time grows however
    fast this machine trains (40 steps can take under 0.05 s, which prints as 0.0 s)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.05
        return self.now


def _seconds(lines: list[str]) -> list[float]:
    """The elapsed time each progress or check line shows."""
    found = [re.search(r"([0-9.]+) s( into training|$)", line) for line in lines]
    assert all(found), lines
    return [float(match.group(1)) for match in found if match]


def test_demo_outside_a_terminal_writes_plain_lines_with_the_trainings_elapsed_time() -> None:
    log = io.StringIO()  # a CI log: isatty() is False
    result = run_demo(steps=40, every=20, mlflow=False, out=log, clock=TickingClock())
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    checks = [line for line in lines if line.startswith("--- check at step")]
    bars = [line for line in lines if line.startswith("training [")]
    assert len(checks) == len(result.reports) == 3  # steps 1, 20, 40
    assert checks[1].startswith("--- check at step 20/40, ")
    assert ": OK, rel_distance " in checks[1] and "(training loss " in checks[1]
    assert 1 <= len(bars) <= 10  # a few progress lines, not one per step
    progress = [line for line in lines if line in checks or line in bars]
    elapsed = _seconds(progress)
    # the training's time throughout: it never restarts from 0 after a check
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0]
    assert elapsed[-1] == pytest.approx(result.seconds, abs=0.2)


def test_demo_in_a_terminal_redraws_one_line() -> None:
    screen = TerminalStream()
    run_demo(steps=40, every=20, mlflow=False, out=screen)
    text = screen.getvalue()
    assert text.count("\r") >= 2 and "\rtraining [" in text
    assert "\n--- check at step 20/40, " in text  # a check starts on a line of its own
    drawn = [part.splitlines()[0].rstrip() for part in text.split("\r")
             if part.startswith("training [")]
    assert _seconds(drawn) == sorted(_seconds(drawn))  # no restart after a check


def test_progress_lines_outside_a_terminal_are_bounded_whatever_the_length() -> None:
    log, clock = io.StringIO(), ManualClock()
    bar = ProgressBar("training", stream=log, unit="steps", clock=clock)
    for step in range(1, 100_001):
        clock.now = step / 2  # half a second a step
        bar(step, 100_000)
        if step % 25_000 == 0:
            bar.note(f"--- check at step {step}, {bar.elapsed:.1f} s into training")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 10 + 4  # one per tenth, one per check
    assert lines[0] == "training [###...........................] 10,000/100,000 steps, 5000.0 s"
    assert _seconds(lines) == sorted(_seconds(lines))

    screen, clock = TerminalStream(), ManualClock()
    bar = ProgressBar("training", stream=screen, unit="steps", rate=1.0, clock=clock)
    for step in range(1, 11):
        clock.now = step / 2
        bar(step, 10)
    bar.note("--- check at step 10")
    bar.close()
    drawn = screen.getvalue()
    assert drawn.startswith("\rtraining [###") and drawn.count("\r") == 6  # at most 1 a second
    assert "10/10 steps" in drawn and drawn.endswith("\n--- check at step 10\n")
