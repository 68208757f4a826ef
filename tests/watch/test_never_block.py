"""Never block, never lose: a tracking server that is down (or slow) when training starts.

These tests use MLflow's *default* client settings (7 retries with exponential backoff, about
four minutes per call against a dead server): the training runs in its own process
(tests/support/outage_train.py) without the fail-fast override the rest of the suite uses.
The training thread's time per step must stay small, every check must wait in the spool, and
once a real `mlflow server` answers on that port, `gradwatch flush` (or the next GradWatch
start, or the running one by itself) delivers every check exactly once into one run, with the
params and the checks' original timestamps.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch import GradWatch
from tests.support.mlflow_server import FAIL_FAST_CLIENT_ENV, MlflowServer, free_port

#: The training thread's time per step, whatever the server does (the checks themselves take
#: ~0.1 s here; a blocked run resolution took 247 s before).
STEP_BOUND = 2.0


def _default_client_env() -> dict[str, str]:
    """The environment of a user who set nothing: no fail-fast MLflow client override."""
    return {k: v for k, v in os.environ.items()
            if k not in FAIL_FAST_CLIENT_ENV and k != "MLFLOW_TRACKING_URI"}


def _train(uri: str, spool: Path, out: Path, *extra: str, wait: bool = True) -> Any:
    command = [sys.executable, "-m", "tests.support.outage_train", "--uri", uri, "--spool",
               str(spool), "--out", str(out), *extra]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2],
                               env=_default_client_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return json.loads(out.read_text())


def _journal(spool: Path) -> list[dict[str, Any]]:
    records = []
    for directory in spool.iterdir():
        journal = directory / "journal.jsonl"
        if journal.exists():
            records += [json.loads(line)["payload"] for line in journal.read_text().splitlines()]
    return records


def _server(tmp_path: Path, port: int) -> MlflowServer:
    """A real `mlflow server` that will listen on `port` once started."""
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root)
    server.port = port
    return server


def _one_run(url: str, experiment: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"experiment {experiment!r} was never created"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"expected one run, got {len(runs)}"
    return client, runs[0]


def _assert_delivered_once(url: str, result: dict[str, Any], before: float,
                           experiment: str = "outage") -> None:
    client, run = _one_run(url, experiment)
    verdicts = client.get_metric_history(run.info.run_id, "gradwatch/verdict")
    assert sorted(m.step for m in verdicts) == result["checks"]  # each check exactly once
    assert all(m.timestamp / 1000 < before for m in verdicts)  # measured, not delivered, time
    assert run.data.params["gradwatch.every"] == "2"
    assert run.data.tags["gradwatch.created"] == "true"
    assert run.data.tags["gradwatch.local_id"] == result["local_id"]


def test_server_down_at_start_then_flush_delivers_everything_once(tmp_path: Path) -> None:
    port = free_port()  # nobody listens here
    spool, out = tmp_path / "spool", tmp_path / "result.json"
    result = _train(f"http://127.0.0.1:{port}", spool, out)
    assert max(result["step_seconds"]) < STEP_BOUND, result["step_seconds"]
    assert result["close_seconds"] < 2.0 + STEP_BOUND  # close(timeout=2) kept its word
    assert result["checks"] == [1, 2, 4, 6, 8, 10, 12] and result["run_id"] is None
    records = _journal(spool)
    assert records[0]["kind"] == "run" and records[0]["local_id"] == result["local_id"]
    assert sorted(r["step"] for r in records if r["kind"] == "check") == result["checks"]
    before = time.time()

    server = _server(tmp_path, port)
    server.start()
    try:
        env = {**_default_client_env(), "GRADWATCH_SPOOL_DIR": str(spool)}
        flush = subprocess.run([sys.executable, "-m", "gradwatch", "flush"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert flush.returncode == 0, flush.stdout + flush.stderr
        assert flush.stdout.endswith(" from 1 run; 1 folder removed\n"), flush.stdout
        assert list(spool.iterdir()) == []  # all delivered, the run ended: the folder goes
        _assert_delivered_once(server.url, result, before)
        again = subprocess.run([sys.executable, "-m", "gradwatch", "flush"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.startswith("nothing to flush")
        _assert_delivered_once(server.url, result, before)  # still once: nothing duplicated
        _, run = _one_run(server.url, "outage")
        assert run.info.status == "FINISHED"  # the run gradwatch created was ended, in order
    finally:
        server.kill()


def test_server_down_at_start_then_the_next_start_delivers(tmp_path: Path) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    first = _train(f"http://127.0.0.1:{port}", spool, tmp_path / "first.json")
    assert max(first["step_seconds"]) < STEP_BOUND
    before = time.time()
    server = _server(tmp_path, port)
    server.start()
    try:
        # another training, same spool root, its own experiment: its start replays the first
        second = _train(server.url, spool, tmp_path / "second.json", "--experiment", "later",
                        "--close-timeout", "120")
        assert second["run_id"] is not None
        _assert_delivered_once(server.url, first, before)
        _assert_delivered_once(server.url, second, time.time(), experiment="later")
        assert list(spool.iterdir()) == []  # the start replayed the first, close removed both
    finally:
        server.kill()


def test_server_coming_up_mid_training_gets_everything_by_itself(tmp_path: Path) -> None:
    port = free_port()
    spool, out = tmp_path / "spool", tmp_path / "result.json"
    process = _train(f"http://127.0.0.1:{port}", spool, out, "--steps", "40", "--sleep",
                     "0.25", "--close-timeout", "200", wait=False)
    server = _server(tmp_path, port)
    try:
        time.sleep(3.0)
        server.start()  # while training runs (and its delivery thread is retrying)
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output
        result = json.loads(out.read_text())
        assert max(result["step_seconds"]) < STEP_BOUND, result["step_seconds"]
        assert result["run_id"] is not None  # resolved by the delivery thread
        _assert_delivered_once(server.url, result, time.time())
        assert list(spool.iterdir()) == []  # everything delivered: nothing left behind
    finally:
        process.kill()
        server.kill()


# ---------------------------------------------------------------------- a slow server
class _SlowProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to `target` after `delay` seconds (a slow proxy or server)."""

    daemon_threads = True

    def __init__(self, target: str, delay: float) -> None:
        self.target, self.delay = target, delay
        super().__init__(("127.0.0.1", 0), _SlowHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    server: _SlowProxy

    def _forward(self) -> None:
        time.sleep(self.server.delay)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(self.server.target + self.path, data=body,
                                         method=self.command)
        for key in ("Content-Type", "Authorization"):
            if self.headers.get(key):
                request.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
                kind = response.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), "application/json"
        except OSError:
            return
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up waiting (its own timeout): nothing to answer
            return

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:
        return


def test_a_slow_server_never_shows_in_the_training_step(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    proxy = _SlowProxy(mlflow_server.url, delay=10.0)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 2))
        batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
        watch = GradWatch(every=2, tracking_uri=proxy.url, spool_dir=tmp_path / "spool",
                          budget=100, experiment_name="slow-proxy",
                          loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
        seconds = []
        for step in range(1, 9):
            started = time.perf_counter()
            watch.step(model, batch, step=step)
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        watch.close(timeout=1.0)
        assert time.perf_counter() - started < 1.0 + STEP_BOUND
        assert max(seconds) < STEP_BOUND, seconds
        assert len(watch.reports) == 5  # steps 1, 2, 4, 6, 8: checks ran, nothing waited
    finally:
        proxy.shutdown()
        proxy.server_close()


# ---------------------------------------------------------------------- bad input
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["batch None", "shapes", "not callable", "raises"])
def test_bad_input_is_a_gradwatch_error_that_says_what_to_do(case: str) -> None:
    model = _model()
    x, wrong = torch.randn(4, 3), torch.randn(4, 5)
    before, rng = _snapshot(model), torch.get_rng_state()
    arguments: dict[str, tuple[Any, Any, type[Exception], str]] = {
        "batch None": (None, lambda m, b: m(b).sum(), gradwatch.InputError, "batch is None"),
        "shapes": ((wrong,), lambda m, b: m(b[0]).sum(), gradwatch.LossError,
                   "mat1 and mat2 shapes cannot be multiplied"),
        "not callable": ((x,), 3, gradwatch.ConfigError, "loss_fn must be a function"),
        "raises": ((x,), lambda m, b: 1 / 0, gradwatch.LossError, "ZeroDivisionError"),
    }
    batch, loss_fn, error, text = arguments[case]
    with pytest.raises(error, match=text) as caught:
        gradwatch.check_module(model, batch, loss_fn)
    message = str(caught.value)
    assert "loss_fn" in message or "batch" in message  # names the argument to fix
    if case in ("shapes", "raises"):
        assert caught.value.__cause__ is not None  # the original stays attached
        assert "float32[4, " in message  # what was got
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    if batch is not None:
        assert batch[0].dtype == torch.float32  # the batch is not modified either


def test_numpy_check_with_a_cost_that_is_not_callable() -> None:
    with pytest.raises(gradwatch.ConfigError, match="cost must be a function"):
        gradwatch.check(3, {"w": [1.0]}, {"w": [1.0]})  # type: ignore[arg-type]


_FORGETS_CLOSE = """
import sys, torch
from torch import nn
from gradwatch import GradWatch
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
watch = GradWatch(every=5, loss_fn=loss_fn, tracking_uri=sys.argv[1],
                  experiment_name="forgot-close", spool_dir=sys.argv[2])
for step in range(1, 31):
    loss = loss_fn(model, batch)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    watch.step(model, batch, step=step)
print(watch.run_id or watch.recorder.local_id)
"""


def test_a_loop_that_never_calls_close_is_closed_at_exit(tmp_path: Path) -> None:
    """A plain loop that ends without `watch.close()`: the interpreter's exit closes the
    watch (bounded), so the process exits 0 — not killed inside native code while the
    background thread delivers or builds the report — and every record reaches MLflow (the
    run's spool folder, all delivered, is gone)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool = tmp_path / "spool"
    done = subprocess.run([sys.executable, "-c", _FORGETS_CLOSE, uri, str(spool)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [p for p in spool.iterdir() if p.is_dir()], list(spool.iterdir())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("forgot-close")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "gradwatch/rel_distance")
    assert [m.step for m in history] == [1, 5, 10, 15, 20, 25, 30]
    assert run.info.status == "FINISHED"
