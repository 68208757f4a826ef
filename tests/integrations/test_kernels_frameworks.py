"""The training-kernels measurement inside real framework training, on CPU under bf16.

HF Trainer (`bf16=True`: Accelerate wraps `forward` in an autocast) and Lightning
(`precision="bf16-mixed"`: the precision plugin's autocast around `training_step`) each train a
tiny model with a check at every step: every check measures the gradient at bfloat16, none
raises a false alarm, and the trained parameters are bit-identical to the same training without
gradwatch. A `torch.autograd.Function` whose backward is wrong only outside float64 (as a fused
kernel with a float64 reference fallback) alerts under Lightning bf16-mixed on the parameter
that feeds it, while central differences on the float64 copy read ok.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradwatch import CheckReport, GradWatch
from tests.support.hf_setup import tiny_bert, train, training_args
from tests.support.kernel_faults import FaultyScaleNet
from tests.support.torch_models import seeded

pytest.importorskip("lightning")
pytest.importorskip("transformers")

import lightning.pytorch as pl

from gradwatch.integrations.lightning import GradWatchCallback

pytestmark = [
    # Lightning 2.6 calls torch.utils._pytree APIs that torch 2.13 deprecates: not ours to fix.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    # On machines with more than 2 cores Lightning suggests DataLoader workers.
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.slow,
]

CHECKS = 10  # at least this many checks per training


def _max_ratio(reports: list[CheckReport]) -> float:
    return max((r.kernels.ratio for r in reports if r.kernels is not None), default=float("nan"))


def _assert_measured_without_alarm(reports: list[CheckReport], autocast: str | None) -> None:
    """Every check measured the training kernels at bfloat16; none alerted or errored."""
    assert len(reports) >= CHECKS, [r.summary() for r in reports]
    ratio = _max_ratio(reports)
    for report in reports:
        kernels = report.kernels
        assert kernels is not None and kernels.status == "measured", report.summary()
        assert kernels.dtype == "bfloat16", (kernels.dtype, report.summary())
        if autocast is not None:
            assert kernels.autocast == autocast, (kernels.autocast, report.summary())
        assert report.verdict not in ("alert", "error"), (
            f"max kernels ratio {ratio:.3g}: {report.summary()}")
        assert kernels.verdict not in ("alert", "error"), (
            f"max kernels ratio {ratio:.3g}: {report.summary()}")


def _assert_bit_identical(first: nn.Module, second: nn.Module) -> None:
    one, two = dict(first.named_parameters()), dict(second.named_parameters())
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


# ---------------------------------------------------------------------- Hugging Face Trainer
def test_hf_trainer_bf16_measures_every_check_and_trains_bit_identically(
    tmp_path: Path,
) -> None:
    steps = CHECKS + 2
    watch = GradWatch(every=1, mlflow=False)
    watched = train(tiny_bert(), training_args(tmp_path / "with", bf16=True, max_steps=steps),
                    [watch])
    plain = train(tiny_bert(), training_args(tmp_path / "without", bf16=True, max_steps=steps))
    assert len(watch.reports) == steps
    # Accelerate's autocast wraps forward, inside the pre-hook: the path says so, and the
    # dtype the measurement emulates is the bfloat16 its ops produced
    _assert_measured_without_alarm(watch.reports, autocast=None)
    _assert_bit_identical(watched.model, plain.model)


# ---------------------------------------------------------------------- Lightning
ROWS, FEATURES, BATCH = 192, 8, 12


class Regression(pl.LightningModule):
    """`net` trained by MSE; training_step logs and returns `{"loss": ...}`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _clean_net() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.GELU(), nn.LayerNorm(32), nn.Dropout(0.1),
                         nn.Linear(32, 1))


def _loader() -> torch.utils.data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    y = torch.tanh(x[:, :1] - x[:, 1:2]) + 0.1 * torch.randn(ROWS, 1, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def _fit_bf16(tmp_path: Path, net: Any, callbacks: list[Any]) -> Regression:
    with seeded(0):
        module = Regression(net())
    trainer = pl.Trainer(
        precision="bf16-mixed", accelerator="cpu", devices=1, max_steps=CHECKS + 2,
        callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    with seeded(1):  # dropout draws from the global RNG: the same stream for every run
        trainer.fit(module, train_dataloaders=_loader())
    return module


def test_lightning_bf16_mixed_measures_every_check_and_trains_bit_identically(
    tmp_path: Path,
) -> None:
    callback = GradWatchCallback(every=1, mlflow=False)
    watched = _fit_bf16(tmp_path / "with", _clean_net, [callback])
    plain = _fit_bf16(tmp_path / "without", _clean_net, [])
    assert callback.watch.autocast == "bfloat16"  # read from trainer.precision
    assert len(callback.reports) == CHECKS + 2
    _assert_measured_without_alarm(callback.reports, autocast="bfloat16")
    _assert_bit_identical(watched, plain)
    for submodule in watched.modules():  # self.log put back on the live module
        assert "log" not in submodule.__dict__ and "log_dict" not in submodule.__dict__


def test_lightning_bf16_mixed_catches_a_backward_wrong_only_outside_float64(
    tmp_path: Path,
) -> None:
    # FaultyScaleNet: first → ScaledBackward(·, scale) → tanh → second, whose dL/dx is 1.5×
    # too large unless float64: net.first's gradient is wrong in training, right in the check
    callback = GradWatchCallback(every=1, mlflow=False)
    _fit_bf16(tmp_path, lambda: FaultyScaleNet(width=16), [callback])
    assert len(callback.reports) >= CHECKS
    for report in callback.reports:
        kernels = report.kernels
        assert kernels is not None and kernels.status == "measured", report.summary()
        assert kernels.autocast == "bfloat16" and kernels.dtype == "bfloat16"
        assert report.definition_verdict == "ok", report.summary()
        assert kernels.verdict == "alert" and report.verdict == "alert", report.summary()
        assert report.fired_by() == ["training kernels"], report.summary()
        # the alert is on the parameters feeding the faulty op, and on nothing else
        feeding = {"net.first.weight", "net.first.bias"}
        assert kernels.worst_layers(1)[0][0] in feeding, report.summary()
        alerting = {name for name, layer in kernels.layers.items() if layer.verdict == "alert"}
        assert "net.first.weight" in alerting, report.summary()
        assert alerting <= feeding, report.summary()
        assert kernels.layers["net.scale"].verdict == "ok", report.summary()  # right gradient
