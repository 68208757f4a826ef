"""`GradWatchCallback` in real Lightning 2.x training: a tiny module, generated data, a real
MLflow server, real `.ckpt` files."""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradWatch
from gradwatch.watch.budget import MINIMUM
from tests.support.mlflow_server import MlflowServer
from tests.support.torch_models import BuggyLinear, BugKind, seeded

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger

from gradwatch.integrations.lightning import GradWatchCallback

pytestmark = [
    # Lightning 2.6 calls torch.utils._pytree APIs that torch 2.13 deprecates: not ours to fix.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    # On machines with more than 2 cores Lightning suggests DataLoader workers.
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
]

ROWS, FEATURES, CLASSES, BATCH = 480, 6, 3, 12


class TinyModule(pl.LightningModule):
    """Linear-Tanh-Dropout-Linear classifier whose training_step logs, reads the trainer and
    returns `{"loss": ...}`; `bug` plants a wrong weight gradient in the last layer."""

    def __init__(self, bug: BugKind = "none", optimizer: str = "sgd") -> None:
        super().__init__()
        last = nn.Linear(16, CLASSES) if bug == "none" else BuggyLinear(16, CLASSES, bug)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(0.2), last)
        self.optimizer = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        self.log_dict({"seen_step": float(self.global_step),
                       "seen_epoch": float(self.trainer.current_epoch)})
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MemoryLogger(Logger):
    """Every metric dict Lightning sends to its loggers, with its step."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def series(self, key: str) -> list[tuple[int | None, float]]:
        return [(step, metrics[key]) for step, metrics in self.records if key in metrics]


def loader(rows: int = ROWS, seed: int = 1) -> torch.utils.data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (rows,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def make_trainer(tmp_path: Path, callbacks: list[Any], logger: Any, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "max_steps": 12, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
        "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=callbacks, logger=logger, **{**settings, **overrides})


def fit(module: pl.LightningModule, trainer: Any, **kwargs: Any) -> Any:
    with seeded(1):  # dropout draws from the global RNG: same stream for every run
        trainer.fit(module, train_dataloaders=loader(), **kwargs)
    return trainer


def tiny_module(**kwargs: Any) -> TinyModule:
    with seeded(0):
        return TinyModule(**kwargs)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_not_silenced(module: nn.Module) -> None:
    """The probe silences `log`/`log_dict` on gradwatch's copy only, never on the live module."""
    for submodule in module.modules():
        assert "log" not in submodule.__dict__ and "log_dict" not in submodule.__dict__


# ---------------------------------------------------------------------- the tests
def test_the_callback_is_a_lightning_callback_and_checks_its_settings() -> None:
    callback = GradWatchCallback(every=5, mlflow=False)
    assert isinstance(callback, pl.Callback)
    if "pytorch_lightning" in sys.modules:  # installed too: one class for both packages
        assert isinstance(callback, sys.modules["pytorch_lightning"].Callback)
    assert callback.watch.every.describe() == "5"
    watch = GradWatch(every=7, mlflow=False)
    assert GradWatchCallback(watch=watch).watch is watch
    with pytest.raises(gradwatch.ConfigError, match="not both; got watch= and every, budget"):
        GradWatchCallback(5, watch=watch, budget=10)
    with pytest.raises(gradwatch.ConfigError, match=r"unknown setting\(s\) evry.*every"):
        GradWatchCallback(evry=5)
    with pytest.raises(gradwatch.ConfigError, match="on_alert"):
        GradWatchCallback(on_alert="panic")


def test_without_lightning_the_import_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None: "not installed" to the importer
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.lightning")  # import it afresh
    with pytest.raises(gradwatch.MissingDependencyError,
                       match=r"pip install 'gradwatch\[lightning\]'"):
        importlib.import_module("gradwatch.integrations.lightning")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_bit_identical_and_the_record_is_in_the_loggers_run(
    mlflow_server: MlflowServer, tmp_path: Path, accumulate: int
) -> None:
    from mlflow import MlflowClient

    experiment = f"lightning-{tmp_path.name}"
    callback = GradWatchCallback(every=4, budget=400, spool_dir=tmp_path / "spool")
    mlflow_logger = MLFlowLogger(experiment_name=experiment, tracking_uri=mlflow_server.url)
    with_watch, without = MemoryLogger(), MemoryLogger()
    checked = tiny_module(optimizer="adam")
    trainer = fit(checked, make_trainer(tmp_path / "with", [callback], [mlflow_logger, with_watch],
                                        accumulate_grad_batches=accumulate))
    plain = tiny_module(optimizer="adam")
    fit(plain, make_trainer(tmp_path / "without", [], without,
                            accumulate_grad_batches=accumulate))

    assert trainer.global_step == 12
    steps = [1, 4, 8, 12]  # first step, then every 4 optimizer steps, once each
    assert [r.probe["step"] for r in callback.reports] == steps
    assert [r.verdict for r in callback.reports] == ["ok"] * 4, callback.reports[0].summary()
    assert all(r.probe["batch"] == ["float32[8, 6]", "int64[8]"] for r in callback.reports)
    assert with_watch.series("train_loss") == without.series("train_loss")
    assert len(without.series("train_loss")) == 12
    first, second = weights(checked), weights(plain)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    client = MlflowClient(mlflow_server.url)
    created = client.get_experiment_by_name(experiment)
    assert created is not None
    runs = client.search_runs([created.experiment_id])
    assert len(runs) == 1, "gradwatch must log into the MLFlowLogger's run, not open its own"
    run = runs[0]
    assert run.info.run_id == mlflow_logger.run_id == callback.watch.run_id
    assert "train_loss" in run.data.metrics  # Lightning's own record, same run
    history = client.get_metric_history(run.info.run_id, "gradwatch/rel_distance")
    assert [m.step for m in history] == steps
    assert "gradwatch/layer/net.3.weight" in run.data.metrics
    assert run.data.params["gradwatch.every"] == "4"
    assert run.data.params["gradwatch.budget"] == "400"
    assert run.data.tags["gradwatch.status"] == "ok"
    assert run.data.tags["gradwatch.last_step"] == "12"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "gradwatch/checks")]
    assert artifacts == [f"gradwatch/checks/step-{s:09d}.json" for s in steps]


def test_an_explicit_run_id_wins_over_the_loggers_run(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    chosen = client.create_run(client.create_experiment(f"chosen-{tmp_path.name}")).info.run_id
    callback = GradWatchCallback(every=2, budget=400, run_id=chosen,
                                 tracking_uri=mlflow_server.url, spool_dir=tmp_path / "spool")
    mlflow_logger = MLFlowLogger(experiment_name=f"logger-{tmp_path.name}",
                                 tracking_uri=mlflow_server.url)
    fit(tiny_module(), make_trainer(tmp_path, [callback], mlflow_logger, max_steps=2))
    assert callback.watch.run_id == chosen
    steps = [m.step for m in client.get_metric_history(chosen, "gradwatch/verdict")]
    assert steps == [1, 2]
    logged = client.get_run(str(mlflow_logger.run_id)).data
    assert "train_loss" in logged.metrics
    assert not any(key.startswith("gradwatch") for key in [*logged.metrics, *logged.params])


def test_the_probe_does_not_overwrite_the_metrics_the_module_logs(tmp_path: Path) -> None:
    # A check at every step: the probe's training_step calls self.log / self.log_dict on the
    # copy, with another loss (float64, 8 rows, dropout off); what reaches the loggers and
    # callback_metrics (what ModelCheckpoint / EarlyStopping monitor) must be training's.
    callback = GradWatchCallback(every=1, budget=400, mlflow=False)
    with_watch, without = MemoryLogger(), MemoryLogger()
    checked, plain = tiny_module(), tiny_module()
    trainer = fit(checked, make_trainer(tmp_path / "with", [callback], with_watch, max_steps=6))
    assert_not_silenced(checked)
    other = fit(plain, make_trainer(tmp_path / "without", [], without, max_steps=6))
    assert [r.verdict for r in callback.reports] == ["ok"] * 6, callback.reports[0].summary()
    for key in ("train_loss", "seen_step", "seen_epoch"):
        assert with_watch.series(key) == without.series(key), key
    assert with_watch.series("seen_step") == [(s, float(s)) for s in range(6)]
    assert trainer.callback_metrics.keys() == other.callback_metrics.keys()
    for key, value in trainer.callback_metrics.items():
        assert torch.equal(value, other.callback_metrics[key]), key
    # the probe's own loss is not training's: the silencing above is what kept them apart
    assert callback.reports[-1].loss != pytest.approx(with_watch.series("train_loss")[-1][1])


def test_a_planted_backward_bug_alerts_and_stops_the_trainer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    callback = GradWatchCallback(every=3, budget=400, mlflow=False, first_step=False,
                                 on_alert="stop")
    module = tiny_module(bug="scaled")  # dW of the last layer doubled
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer = fit(module, make_trainer(tmp_path, [callback], False, max_steps=30))
    assert trainer.global_step == 3  # stopped at the first check, not at max_steps
    report = callback.reports[-1]
    assert report.verdict == "alert"
    assert report.worst_layers(1)[0][0] == "net.3.weight"
    assert any("ALERT" in record.getMessage() for record in caplog.records)


def test_on_alert_raise_ends_the_fit_with_the_alert(tmp_path: Path) -> None:
    callback = GradWatchCallback(every=2, budget=400, mlflow=False, on_alert="raise")
    with pytest.raises(gradwatch.GradientAlertError, match="step 1"):
        fit(tiny_module(bug="scaled"), make_trainer(tmp_path, [callback], False))
    assert not callback.watch.schedule.running  # closed by on_exception


def test_resuming_from_a_checkpoint_keeps_the_schedule_and_the_budget(tmp_path: Path) -> None:
    # 4 batches an epoch; every=2 checks steps 1, 2, 4, and the end-of-epoch .ckpt is written
    # after the check at step 4. A tiny overhead keeps the adaptive budget at its floor, where
    # the joint screen still looks at every tensor in every check.
    def callback() -> GradWatchCallback:
        return GradWatchCallback(every=2, overhead=1e-4, mlflow=False)

    def checkpoints() -> ModelCheckpoint:  # the resumed fit needs the same one
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)

    class StateAtTrainStart(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.state = watch_callback.watch.state_dict()

    first = callback()
    trainer = make_trainer(tmp_path, [first, checkpoints()], False, max_steps=-1, max_epochs=1,
                           enable_checkpointing=True)
    with seeded(1):
        trainer.fit(tiny_module(), train_dataloaders=loader(rows=4 * BATCH))
    assert [r.probe["step"] for r in first.reports] == [1, 2, 4]
    saved = first.watch.state_dict()
    # resume from a copy, so the resumed fit's ModelCheckpoint finds its directory empty
    path = tmp_path / "resume.ckpt"
    shutil.move(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", path)
    shutil.rmtree(tmp_path / "ckpt")
    stored = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert stored["last_checked"] == 4 and stored["budget"] == saved["budget"]

    watch_callback = callback()
    spy = StateAtTrainStart()
    resumed = make_trainer(tmp_path, [watch_callback, spy, checkpoints()],
                           False, max_steps=-1, max_epochs=2, enable_checkpointing=True)
    with seeded(1):
        resumed.fit(tiny_module(), train_dataloaders=loader(rows=4 * BATCH), ckpt_path=path)
    assert spy.state["last_checked"] == 4 and spy.state["budget"] == saved["budget"]
    # step 5 is the first step of this fit, but not the first of the run: no first-step check
    assert [r.probe["step"] for r in watch_callback.reports] == [6, 8]
    names = [name for name, _ in tiny_module().named_parameters()]
    for report in watch_callback.reports:
        assert report.probe["budget"] == MINIMUM  # the adaptive budget's floor
        assert report.coverage["screened"] == len(names) == len(report.layers)


def test_manual_optimization_needs_a_loss_fn(tmp_path: Path) -> None:
    class Manual(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor],
                          batch_idx: int) -> Any:
            optimizer: Any = self.optimizers()
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return loss

    with pytest.raises(gradwatch.ConfigError, match=r"manual optimization.*loss_fn="):
        fit(Manual(), make_trainer(tmp_path, [GradWatchCallback(mlflow=False)], False))

    def objective(module: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(module.net(batch[0]), batch[1])

    callback = GradWatchCallback(every=3, budget=400, mlflow=False, loss_fn=objective)
    fit(Manual(), make_trainer(tmp_path, [callback], False, max_steps=6))
    assert [(r.probe["step"], r.verdict) for r in callback.reports] == [
        (1, "ok"), (3, "ok"), (6, "ok")]


def test_a_pytorch_lightning_trainer_takes_the_same_callback(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    pytest.importorskip("pytorch_lightning")
    import pytorch_lightning
    from mlflow import MlflowClient

    class Module(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = GradWatchCallback(every=2, budget=400, spool_dir=tmp_path / "spool")
    logger = pytorch_lightning.loggers.MLFlowLogger(
        experiment_name=f"pl-{tmp_path.name}", tracking_uri=mlflow_server.url)
    trainer = pytorch_lightning.Trainer(
        callbacks=[callback], logger=logger, max_steps=4, accelerator="cpu", devices=1,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path)
    with seeded(0):
        trainer.fit(Module(), train_dataloaders=loader())
    assert [(r.probe["step"], r.verdict) for r in callback.reports] == [
        (1, "ok"), (2, "ok"), (4, "ok")]
    history = MlflowClient(mlflow_server.url).get_metric_history(
        str(logger.run_id), "gradwatch/verdict")
    assert [m.step for m in history] == [1, 2, 4]
