"""Lightning 2.x: `GradWatchCallback`, a `Callback` over `gradwatch.GradWatch`.

    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from gradwatch.integrations.lightning import GradWatchCallback

    trainer = L.Trainer(callbacks=[GradWatchCallback(every=1000)],
                        logger=MLFlowLogger(tracking_uri="http://127.0.0.1:5000"))
    trainer.fit(module, datamodule)

`GradWatchCallback(every, **settings)` takes `GradWatch`'s settings (`budget=`, `on_alert=`,
`notify=`, ...), or a ready `GradWatch` with `watch=`. One class serves both package names: it
subclasses `lightning.pytorch.Callback` and `pytorch_lightning.Callback`, whichever of the two
are installed, so the same instance goes to a `lightning.Trainer` or a
`pytorch_lightning.Trainer` (with both installed, importing this module imports both).

- **When**: once per optimizer step, in `on_train_batch_end` of the batch that moved
  `trainer.global_step` (with `accumulate_grad_batches=k` that is every k-th batch), on every
  rank; `GradWatch.step` keeps the schedule and checks on global rank zero only.
- **Probe batch**: the training batch of that step (the last micro-batch of an accumulation
  window), as the trainer handed it to `training_step`; its first `probe_rows=8` rows.
- **Loss**: the module's own `training_step(batch, batch_idx)` (a tensor, or a dict with
  "loss"), run on gradwatch's float64 copy of the module, which gets the trainer reference (so
  `self.global_step`, `self.trainer` read as in training) and whose `self.log` / `self.log_dict`
  do nothing: the probe never overwrites the metrics you log, nor what `ModelCheckpoint` and
  `EarlyStopping` monitor. Pass `loss_fn=lambda module, batch: ...` to check another objective.
- **MLflow run**: with an `MLFlowLogger` on the trainer, the logger's run (its tracking URI and
  `run_id`); otherwise `GradWatch`'s own resolution (the active run, `MLFLOW_RUN_ID`, or a new
  run). An explicit `GradWatch(run_id=..., tracking_uri=...)` wins over both.
- **Checkpoints**: the schedule (last checked step), the alert state, the tensor rotation and
  the adaptive budget are saved in `.ckpt` files and restored on resume; a resumed run does not
  check a step it checked already.
- **Stopping**: `on_alert="stop"` sets `trainer.should_stop` (agreed across ranks by
  `GradWatch.step`); `on_alert="raise"` raises `GradientAlertError` out of the fit.

Not supported: manual optimization (`automatic_optimization = False`) and `training_step(self,
dataloader_iter)` unless you pass `loss_fn=` (their `training_step` steps optimizers or consumes
the iterator itself); sharded parameters (FSDP, DeepSpeed ZeRO-3): `GradWatch` records one
"error" check saying so and stops checking; a `training_step` that calls collectives itself
(`self.all_gather`, a `dist` call; `self.log(..., sync_dist=True)` is silenced, so fine) would
wait for the other ranks while rank zero checks.

Imports: gradwatch (the public API, the watch and the record), lightning.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

from gradwatch.common.errors import ConfigError, LossError, missing_dependency
from gradwatch.engine.report import CheckReport
from gradwatch.record.writer import resolve_tracking_uri
from gradwatch.watch.callback import GradWatch, adapter_watch

__all__ = ["GradWatchCallback"]

logger = logging.getLogger("gradwatch")

#: The Lightning 2.x package names, in the order their `Callback` classes come in the MRO.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _import_packages() -> tuple[Any, ...]:
    found = []
    for name in PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.split(".")[0]):
                raise  # installed, but something it needs is missing: say that, not this
    if not found:
        raise missing_dependency("gradwatch.integrations.lightning", "lightning", "lightning")
    return tuple(found)


_PACKAGES = _import_packages()
_LIGHTNING_MODULES = tuple(package.LightningModule for package in _PACKAGES)
_MLFLOW_LOGGERS = tuple(package.loggers.MLFlowLogger for package in _PACKAGES)
#: Lightning's own rule for which arguments `training_step` takes (same code in both packages).
_is_param_in_hook_signature = importlib.import_module(
    f"{_PACKAGES[0].__name__}.utilities.signature_utils"
).is_param_in_hook_signature
#: The base of `GradWatchCallback`: the `Callback` of every installed Lightning package.
_CallbackBase: Any = type("_CallbackBase", tuple(package.Callback for package in _PACKAGES), {})


class GradWatchCallback(_CallbackBase):
    """Numerical gradient checks during Lightning training, logged to MLflow, with alerts.

    Args:
        every: optimizer steps between checks, or a wall-clock schedule ("30min", a cron
            expression); default `GradWatch`'s (1000).
        watch: a `GradWatch` to drive instead of building one (then give no other setting).
        **settings: `GradWatch`'s keyword arguments: `loss_fn`, `probe`, `first_step`,
            `probe_rows`, `mode`, `budget`, `overhead`, `thresholds`, `on_alert`, `notify`,
            `tracking_uri`, `run_id`, `spool_dir`, `mlflow`, ...

    Example:
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> callback = GradWatchCallback(every=500, budget=300, on_alert="stop", mlflow=False)
        >>> callback
        GradWatchCallback(GradWatch(every='500', mode='auto', budget=300, on_alert='stop'))
        >>> callback.state_key
        "GradWatchCallback{'every': '500'}"
    """

    def __init__(
        self, every: int | str | None = None, *, watch: GradWatch | None = None, **settings: Any
    ) -> None:
        watch = adapter_watch(every, watch, settings)
        self.watch = watch
        # What the user chose, before a checkpoint's state (its run id) is loaded.
        self._chosen_run_id = watch.run_id
        self._chosen_tracking_uri = watch.tracking_uri
        self._last_global_step: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.watch!r})"

    @property
    def reports(self) -> list[CheckReport]:
        """The checks run in this process (on global rank zero), oldest first."""
        return self.watch.reports

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.watch.loss_fn is None:
            _require_plain_training_step(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_global_step = int(trainer.global_step)
        if self.watch.autocast == "auto":  # the training-kernels measurement's autocast
            self.watch.autocast = LIGHTNING_AUTOCAST.get(str(trainer.precision))
        if trainer.global_rank != 0:
            return  # GradWatch.step checks on global rank zero only; no record elsewhere
        try:
            run_id = self._mlflow_run(trainer)
        except Exception as exc:  # never crash training over its record
            if self.watch.strict:
                raise
            logger.error("gradwatch: cannot tell which MLflow run the trainer logs into (%s: "
                         "%s); GradWatch resolves its own", type(exc).__name__, exc)
            run_id = None
        # No model: the probe is the batch given to step(), there is nothing to capture.
        self.watch.setup(None, active_run_id=run_id)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if step == self._last_global_step:
            return  # accumulating gradients: no optimizer step since the last call
        self._last_global_step = step
        self._step(trainer, pl_module, batch, batch_idx, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.watch.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.watch.close()

    @property
    def state_key(self) -> str:
        key: str = self._generate_state_key(every=self.watch.every.describe())
        return key

    def state_dict(self) -> dict[str, Any]:
        return self.watch.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.watch.load_state_dict(state_dict)

    # ------------------------------------------------------------------ the check
    def _step(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, step: int) -> None:
        watch = self.watch
        loss_fn = None if watch.loss_fn is not None else _TrainingStepLoss(
            trainer, pl_module, batch_idx
        )
        probe_batch = None if watch.probe is not None else batch  # GradWatch(probe=) wins
        watch.step(_checked_module(trainer, pl_module), probe_batch, step=step, loss_fn=loss_fn)
        if watch.should_stop:
            trainer.should_stop = True

    def _mlflow_run(self, trainer: Any) -> str | None:
        """The run to log into, as `active_run_id` for `GradWatch.setup`: the MLFlowLogger's
        (its tracking URI too), else MLflow's active run; None leaves it to GradWatch. A run id
        loaded from a checkpoint gives way to the logger's run, which holds this fit's metrics.
        """
        watch = self.watch
        if not watch.use_mlflow or self._chosen_run_id is not None:
            return None
        mlflow_logger = next(
            (lg for lg in trainer.loggers if isinstance(lg, _MLFLOW_LOGGERS)), None
        )
        if mlflow_logger is not None:
            uri = str(mlflow_logger.experiment.tracking_uri)
            if self._chosen_tracking_uri is None or _same_store(self._chosen_tracking_uri, uri):
                watch.tracking_uri, watch.run_id = uri, None
                return str(mlflow_logger.run_id)
            return None
        return watch.recorder.active_run_id()


def _checked_module(trainer: Any, pl_module: Any) -> Any:
    """What GradWatch checks: the module, or under Lightning's `FSDPStrategy` (FSDP1) the
    root `FullyShardedDataParallel` that wraps it — the root wrapper owns the parameters of
    the module's own layers (embeddings, heads), which only it can unshard."""
    root = getattr(trainer.strategy, "model", None)
    if getattr(root, "_fsdp_wrapped_module", None) is pl_module:
        return root
    return pl_module


def _same_store(first: str, second: str) -> bool:
    return resolve_tracking_uri(first) == resolve_tracking_uri(second)


def _require_plain_training_step(pl_module: Any) -> None:
    """The default loss calls `training_step` on a copy: it must only compute the loss."""
    if not getattr(pl_module, "automatic_optimization", True):
        raise ConfigError(
            f"{type(pl_module).__name__} uses manual optimization (automatic_optimization = "
            f"False): its training_step steps the optimizers itself, so gradwatch cannot call "
            f"it to compute the loss. Pass the objective: GradWatchCallback(..., "
            f"loss_fn=lambda module, batch: <scalar loss tensor>)."
        )
    if _is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise ConfigError(
            f"{type(pl_module).__name__}.training_step takes a dataloader_iter: gradwatch "
            f"cannot call it on one probe batch. Pass the objective: GradWatchCallback(..., "
            f"loss_fn=lambda module, batch: <scalar loss tensor>)."
        )


def _no_logging(*args: Any, **kwargs: Any) -> None:
    return None


#: Lightning's `precision=` → the autocast dtype its precision plugin trains under ("-true"
#: precisions convert the parameters instead, which the measurement reads from them).
LIGHTNING_AUTOCAST = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


class _TrainingStepLoss:
    """`loss_fn(shadow, batch)`: the loss of the module's own `training_step`, called on
    gradwatch's float64 copy (`shadow`) with `self.log` / `self.log_dict` silenced on it."""

    def __init__(self, trainer: Any, live: Any, batch_idx: int) -> None:
        self.trainer = trainer
        self.live = live
        self.batch_idx = batch_idx
        # Lightning passes batch_idx when training_step takes a second argument
        self.takes_batch_idx = _is_param_in_hook_signature(
            live.training_step, "batch_idx", min_args=2
        )

    def __call__(self, shadow: Any, batch: Any) -> Any:
        if shadow is self.live:  # never silence the user's own module
            raise RuntimeError("gradwatch must call training_step on its float64 copy of the "
                               "module, not on the module being trained")
        if shadow.__dict__.get("log") is not _no_logging:
            _prepare_shadow(shadow, self.trainer)
        return _loss_of(self._training_step(shadow, batch), type(shadow).__name__)

    def training_loss(self, live: Any, batch: Any) -> Any:
        """The loss on the module being trained, for the training-kernels measurement (its
        gradient at the training precision, by autograd.grad: nothing of the module changes):
        `self.log` / `self.log_dict` are silenced for the call and put back exactly."""
        saved = [(module, {key: module.__dict__[key] for key in ("log", "log_dict")
                           if key in module.__dict__})
                 for module in live.modules() if isinstance(module, _LIGHTNING_MODULES)]
        try:
            for module, _ in saved:
                module.__dict__["log"] = module.__dict__["log_dict"] = _no_logging
            output = self._training_step(live, batch)
        finally:
            for module, attributes in saved:
                for key in ("log", "log_dict"):
                    module.__dict__.pop(key, None)
                module.__dict__.update(attributes)
        return _loss_of(output, type(live).__name__)

    def _training_step(self, module: Any, batch: Any) -> Any:
        if self.takes_batch_idx:
            return module.training_step(batch, self.batch_idx)
        return module.training_step(batch)


def _prepare_shadow(shadow: Any, trainer: Any) -> None:
    for module in shadow.modules():
        if isinstance(module, _LIGHTNING_MODULES):
            module.log = _no_logging  # instance attributes on the copy only
            module.log_dict = _no_logging
    # deepcopy went through LightningModule.__getstate__, which drops the trainer reference:
    # give it back so training_step reads self.trainer / self.global_step as in training (the
    # setter reaches nested LightningModules too).
    shadow.trainer = trainer


def _loss_of(output: Any, name: str) -> Any:
    """The loss in what `training_step` returned: a tensor, or a mapping with "loss"."""
    if isinstance(output, Mapping):
        if "loss" in output:
            return output["loss"]
        raise LossError(
            f"{name}.training_step returned a dict without 'loss' (keys: "
            f"{', '.join(map(str, output))}); Lightning and gradwatch take the loss from "
            f"output['loss']. Return it there, or pass GradWatchCallback(loss_fn=...)."
        )
    if output is None:
        raise LossError(
            f"{name}.training_step returned None for the probe batch (Lightning skips such "
            f"batches), so there is no loss to check. Pass GradWatchCallback(loss_fn=lambda "
            f"module, batch: <scalar loss tensor>) or GradWatchCallback(probe=<a batch>)."
        )
    return output
