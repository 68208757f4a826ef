"""gradwatch.check_module on PyTorch models: planted backward bugs alert, clean models do not.

The bugs are custom autograd Functions with a correct forward and a wrong backward (see
tests/support/torch_models.py). Each bug must be flagged on the parameter it breaks, and only there;
the clean models (ReLU, conv + max-pool, BatchNorm + Dropout, attention, embedding, GRU, L2)
must not alert.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch
from torch import nn

import gradwatch
from tests.support.torch_models import (
    BAD_ELEMENT,
    BAD_ROW,
    BUG_KINDS,
    SUBTLE_FACTOR,
    BugKind,
    LossFn,
    attention_model,
    batchnorm_cnn,
    batchnorm_mlp,
    big_bug_model,
    bug_model,
    classification_batch,
    cnn,
    cross_entropy_loss,
    detached_weight_model,
    dropout_in_loss,
    embedding_batch,
    embedding_model,
    gru_model,
    image_batch,
    kink_model,
    l2_regularised,
    mse_loss,
    nan_loss,
    noise_in_loss,
    regression_batch,
    relu_mlp,
    sequence_batch,
    split_attention_model,
    tanh_mlp,
    with_buggy_l2_penalty,
)

WARN = 1e-5
ALERT = 1e-3
Mode = Literal["full", "sample", "sketch", "auto"]
BATCH = 8  # rows of regression_batch in the small bug tests (mean_not_sum divides by it)


def flagged(report: gradwatch.CheckReport) -> set[str]:
    """Names of the layers whose verdict is not "ok"."""
    return {name for name, layer in report.layers.items() if layer.verdict != "ok"}


def assert_blames_exactly(
    report: gradwatch.CheckReport, expected: set[str], verdict: str = "alert"
) -> None:
    """`report` has `verdict`, flags exactly the `expected` layers and ranks one of them worst."""
    summary = report.summary()
    assert report.verdict == verdict, summary
    assert flagged(report) == expected, summary
    assert all(report.layers[name].verdict == verdict for name in expected), summary
    worst_name, _ = report.worst_layers(1)[0]
    assert worst_name in expected, summary


# ------------------------------------------------------------------ planted bugs, full mode
#: Layers of `bug_model` that each bug breaks ("2" is the BuggyLinear, "0" the layer before it).
BLAMED: dict[BugKind, set[str]] = {
    "scaled": {"2.weight"},
    "transposed": {"2.weight"},
    "sign": {"2.weight"},
    "sign_input": {"0.weight", "0.bias"},
    "mean_not_sum": {"2.bias"},
    "one_row": {"2.weight"},
    "one_element": {"2.weight"},
    "dropped_input_grad": {"0.weight", "0.bias"},
    "subtle": {"2.weight"},
}

#: rel_distance the broken layer must have, from the bug's algebra (analytic a vs true n):
#: a = c·n gives |c − 1| / (|c| + 1); a = 0 gives 1.
EXACT_DISTANCE: dict[BugKind, tuple[str, float]] = {
    "scaled": ("2.weight", 1 / 3),
    "sign": ("2.weight", 1.0),
    "sign_input": ("0.weight", 1.0),
    "mean_not_sum": ("2.bias", (BATCH - 1) / (BATCH + 1)),
    "dropped_input_grad": ("0.weight", 1.0),
    "subtle": ("2.weight", (SUBTLE_FACTOR - 1) / (SUBTLE_FACTOR + 1)),
}


@pytest.mark.parametrize("bug", BUG_KINDS)
def test_planted_bug_is_flagged_on_the_layer_it_breaks(bug: BugKind) -> None:
    report = gradwatch.check_module(
        bug_model(bug), regression_batch(BATCH, 4, 3), mse_loss, mode="full", top_k=36
    )
    assert report.mode == "full"
    assert report.coordinates == sum(p.numel() for p in bug_model("none").parameters())
    expected_verdict = "warn" if bug == "subtle" else "alert"
    assert_blames_exactly(report, BLAMED[bug], expected_verdict)
    if bug in EXACT_DISTANCE:
        name, distance = EXACT_DISTANCE[bug]
        assert report.layers[name].rel_distance == pytest.approx(distance, rel=1e-4)


def test_subtle_bug_warns_without_any_alerting_element() -> None:
    report = gradwatch.check_module(
        bug_model("subtle"), regression_batch(BATCH, 4, 3), mse_loss, mode="full"
    )
    assert report.verdict == "warn", report.summary()
    assert WARN <= report.rel_distance < ALERT
    assert report.max_element_error < ALERT
    assert report.layers["2.weight"].verdict == "warn"
    assert not any("alert" in reason for reason in report.reasons), report.summary()


def test_one_row_bug_points_at_the_row() -> None:
    report = gradwatch.check_module(
        bug_model("one_row"), regression_batch(BATCH, 4, 3), mse_loss, mode="full", top_k=36
    )
    layer = report.layers["2.weight"]
    assert layer.worst[0].index[0] == BAD_ROW, report.summary()
    bad = [element.index for element in layer.worst if element.rel_error >= ALERT]
    assert len(bad) == 6 and all(index[0] == BAD_ROW for index in bad), report.summary()
    # analytic = 1.5 · numeric on that row: |1.5 − 1| / 2.5
    assert layer.worst[0].rel_error == pytest.approx(0.2, rel=1e-4)


def test_one_element_bug_points_at_the_element() -> None:
    report = gradwatch.check_module(
        bug_model("one_element"), regression_batch(BATCH, 4, 3), mse_loss, mode="full", top_k=36
    )
    layer = report.layers["2.weight"]
    assert layer.worst[0].index == BAD_ELEMENT, report.summary()
    bad = [element.index for element in layer.worst if element.rel_error >= ALERT]
    assert bad == [BAD_ELEMENT], report.summary()
    assert report.max_element_error == pytest.approx(layer.worst[0].rel_error)


def test_transposed_weight_grad_is_flagged_off_the_diagonal_only() -> None:
    report = gradwatch.check_module(
        bug_model("transposed"), regression_batch(BATCH, 4, 3), mse_loss, mode="full", top_k=36
    )
    for element in report.layers["2.weight"].worst:
        row, column = element.index
        if row == column:  # the diagonal of Gᵀ is the diagonal of G
            assert element.rel_error < WARN, report.summary()


def test_wrong_regulariser_gradient_is_flagged() -> None:
    # loss = mse + 0.1·||W₂||², whose custom backward returns 0.1·W₂ instead of 0.2·W₂
    loss_fn = with_buggy_l2_penalty(mse_loss, "2.weight", strength=0.1)
    report = gradwatch.check_module(
        bug_model("none"), regression_batch(BATCH, 4, 3), loss_fn, mode="full"
    )
    assert_blames_exactly(report, {"2.weight"})


def test_stray_detach_is_flagged() -> None:
    # y = x @ W.detach().T + b: the loss depends on W, autograd gives it no gradient
    report = gradwatch.check_module(
        detached_weight_model(), regression_batch(BATCH, 4, 3), mse_loss, mode="full"
    )
    assert_blames_exactly(report, {"2.weight"})
    assert report.probe["unused_parameters"] == ["2.weight"]
    assert report.layers["2.weight"].rel_distance == pytest.approx(1.0)
    assert all(element.analytic == 0.0 for element in report.layers["2.weight"].worst)
    assert any("stray .detach()" in reason for reason in report.reasons), report.summary()


# ------------------------------------------------------------------ planted bugs, auto mode
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bug", ["one_row", "one_element"])
def test_auto_mode_localises_a_sparse_bug_in_a_big_layer(bug: BugKind, seed: int) -> None:
    model = big_bug_model(bug, seed=seed)
    weight = model.get_parameter("0.weight")
    assert 2 * sum(p.numel() for p in model.parameters()) + 2 > 2000  # auto cannot go full
    batch = regression_batch(4, 512, 512, seed=seed)
    report = gradwatch.check_module(model, batch, mse_loss, mode="auto", budget=2000, seed=seed)
    summary = report.summary()
    assert "full" not in report.strategy, summary
    assert report.evaluations <= 2000, summary
    assert report.layers["0.weight"].checked < weight.numel()
    assert_blames_exactly(report, {"0.weight"})
    worst = report.layers["0.weight"].worst[0]
    if bug == "one_row":
        assert worst.index[0] == BAD_ROW, summary
    else:
        assert worst.index == BAD_ELEMENT, summary


@pytest.mark.parametrize(("bug", "verdict"), [("scaled", "alert"), ("subtle", "warn")])
def test_auto_mode_grades_a_dense_bug_in_a_big_layer(bug: BugKind, verdict: str) -> None:
    report = gradwatch.check_module(
        big_bug_model(bug), regression_batch(4, 512, 512), mse_loss, mode="auto", budget=2000
    )
    assert "full" not in report.strategy, report.summary()
    assert_blames_exactly(report, {"0.weight"}, verdict)


# ------------------------------------------------------------------ clean models
Case = tuple[nn.Module, Any, LossFn]


def _relu_mlp() -> Case:
    return relu_mlp(), classification_batch(8, 5, 3), cross_entropy_loss


def _cnn() -> Case:
    return cnn(), image_batch(4, 1, 8, 3), cross_entropy_loss


def _batchnorm_mlp() -> Case:
    x, y = classification_batch(8, 5, 3)
    return batchnorm_mlp(x), (x, y), cross_entropy_loss


def _batchnorm_cnn() -> Case:
    x, y = image_batch(4, 1, 8, 3)
    return batchnorm_cnn(x), (x, y), cross_entropy_loss


def _attention() -> Case:
    return attention_model(), sequence_batch(3, 5, 4, 3), cross_entropy_loss


def _split_attention() -> Case:
    return split_attention_model(), sequence_batch(3, 5, 4, 3), cross_entropy_loss


def _embedding() -> Case:
    return embedding_model(), embedding_batch(4, 3, 12, 3), cross_entropy_loss


def _gru() -> Case:
    return gru_model(), sequence_batch(4, 5, 3, 3), cross_entropy_loss


def _l2_regularised() -> Case:
    return tanh_mlp(), regression_batch(BATCH, 4, 3), l2_regularised(mse_loss, 1e-2)


CLEAN: dict[str, Callable[[], Case]] = {
    "relu_mlp": _relu_mlp,
    "cnn_maxpool": _cnn,
    "batchnorm1d_dropout": _batchnorm_mlp,
    "batchnorm2d_dropout2d": _batchnorm_cnn,
    "multihead_attention": _attention,
    "split_attention": _split_attention,
    "embedding": _embedding,
    "gru": _gru,
    "l2_regularised": _l2_regularised,
}


@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_model_does_not_alert(name: str) -> None:
    model, batch, loss_fn = CLEAN[name]()
    report = gradwatch.check_module(model, batch, loss_fn, mode="full")
    assert report.verdict in ("ok", "warn"), report.summary()
    assert report.kinks == 0, report.summary()
    assert all(layer.checked == layer.numel for layer in report.layers.values())
    assert report.coordinates == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["batchnorm1d_dropout", "batchnorm2d_dropout2d"])
def test_batchnorm_and_dropout_are_checked_in_eval_mode_without_touching_the_model(
    name: str,
) -> None:
    model, batch, loss_fn = CLEAN[name]()
    assert all(module.training for module in model.modules())
    buffers = {key: value.clone() for key, value in model.named_buffers()}
    means = [value for key, value in buffers.items() if key.endswith("running_mean")]
    assert means and all(bool(mean.abs().sum() > 0) for mean in means)  # not the defaults
    weights = {key: value.detach().clone() for key, value in model.named_parameters()}
    # Dropout(0.5) left on would make J(θ) differ between two evaluations: verdict "error"
    report = gradwatch.check_module(model, batch, loss_fn, mode="full")
    assert report.verdict in ("ok", "warn"), report.summary()
    # J(θ) is the eval-mode loss (running statistics, no dropout) of the float64 model
    x, y = batch
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        expected = float(loss_fn(reference, (x.double(), y)))
    assert report.loss == pytest.approx(expected, rel=1e-12, abs=0)
    assert all(module.training for module in model.modules())
    for key, value in model.named_buffers():
        assert torch.equal(value, buffers[key]), key
    for key, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32
        assert parameter.grad is None
        assert torch.equal(parameter.detach(), weights[key])


def test_attention_key_bias_has_a_zero_gradient_and_is_not_flagged() -> None:
    model, batch, loss_fn = _attention()
    report = gradwatch.check_module(model, batch, loss_fn, mode="full", top_k=12)
    assert report.verdict in ("ok", "warn"), report.summary()
    layer = report.layers["attn.in_proj_bias"]
    assert layer.verdict == "ok", report.summary()
    dim = 4
    key_part = [e for e in layer.worst if dim <= e.index[0] < 2 * dim]
    assert len(key_part) == dim
    for element in key_part:  # softmax is shift-invariant: the true gradient is exactly 0
        assert abs(element.analytic) < 1e-12 and abs(element.numeric) < 1e-12, element
        assert element.rel_error < WARN


def test_split_attention_key_bias_alone_is_at_noise_and_ok() -> None:
    # key.bias is a tensor of its own whose gradient is exactly zero; checked alone, the
    # whole gradient is noise and must read "ok", not a distance of ~1 between two noises
    model, batch, loss_fn = _split_attention()
    report = gradwatch.check_module(model, batch, loss_fn, mode="full", include="key.bias")
    assert report.verdict == "ok", report.summary()
    assert list(report.layers) == ["key.bias"]
    assert report.layers["key.bias"].rel_distance < WARN


def test_unused_embedding_rows_have_exactly_zero_gradients() -> None:
    model, batch, loss_fn = _embedding()
    tokens, _ = batch
    report = gradwatch.check_module(model, batch, loss_fn, mode="full", top_k=48)
    unused = set(range(12)) - set(tokens.unique().tolist())
    assert unused
    zero_rows = [e for e in report.layers["embedding.weight"].worst if e.index[0] in unused]
    assert len(zero_rows) == 4 * len(unused)
    assert all(e.analytic == 0.0 and e.numeric == 0.0 for e in zero_rows)


# ------------------------------------------------------------------ broken losses
@pytest.mark.parametrize("loss_fn", [dropout_in_loss, noise_in_loss], ids=["dropout", "randn"])
def test_non_deterministic_loss_is_an_error(loss_fn: LossFn) -> None:
    before = torch.get_rng_state()
    report = gradwatch.check_module(tanh_mlp(), regression_batch(BATCH, 4, 3), loss_fn)
    assert report.verdict == "error", report.summary()
    assert any("dropout" in reason for reason in report.reasons), report.summary()
    assert all(layer.verdict == "error" for layer in report.layers.values())
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched


def test_nan_loss_alerts_as_non_finite() -> None:
    report = gradwatch.check_module(tanh_mlp(), regression_batch(BATCH, 4, 3), nan_loss)
    assert report.verdict == "alert", report.summary()
    assert any("non-finite" in reason for reason in report.reasons), report.summary()


# ------------------------------------------------------------------ kinks
def test_relu_pre_activation_within_eps_of_zero_is_a_kink_not_a_bug() -> None:
    unit = 1
    model, batch = kink_model(unit=unit)
    report = gradwatch.check_module(model, batch, mse_loss, mode="full", top_k=12)
    summary = report.summary()
    assert report.kinks >= 1, summary
    assert report.verdict not in ("alert", "error"), summary
    bias = report.layers["0.bias"]
    assert bias.kinks == 1, summary
    kinked = [e for e in bias.worst if e.kink]
    assert [e.index for e in kinked] == [(unit,)], summary
    # backprop's slope and the two-sided average really disagree there
    assert kinked[0].rel_error >= ALERT
    assert report.max_element_error < ALERT  # kinks are left out of the element rule
    # the distance the verdict used is reported beside the recipe's (which includes the kink)
    assert report.rel_distance_without_kinks is not None
    assert report.rel_distance_without_kinks < WARN <= report.rel_distance, summary
    assert bias.rel_distance_without_kinks is not None and bias.rel_distance_without_kinks < WARN
    assert "without kinks" in summary


def test_same_model_away_from_the_kink_has_none() -> None:
    model, batch = kink_model(offset=0.5)
    report = gradwatch.check_module(model, batch, mse_loss, mode="full")
    assert report.kinks == 0, report.summary()
    assert report.verdict == "ok", report.summary()


# ------------------------------------------------------------------ every mode
@pytest.mark.parametrize("mode", ["full", "sample", "sketch", "auto"])
@pytest.mark.parametrize("bug", ["none", "scaled"], ids=["clean", "scaled"])
def test_every_mode_passes_clean_and_alerts_on_scaled(mode: Mode, bug: BugKind) -> None:
    # 403 parameters: full costs 808 evaluations, so budget=300 makes auto search
    model = bug_model(bug, width=16)
    report = gradwatch.check_module(
        model, regression_batch(BATCH, 4, 3), mse_loss, mode=mode, budget=300
    )
    summary = report.summary()
    assert report.mode == mode
    if mode != "full":
        assert report.evaluations <= 300, summary
    if bug == "none":
        assert report.verdict == "ok", summary
    else:
        assert_blames_exactly(report, {"2.weight"})


# ------------------------------------------------------------------ auto on a wide ReLU network
def wide_relu_mlp(seed: int) -> nn.Sequential:
    """784-256-256-10 ReLU (~269k parameters): auto mode cannot go full within 2000."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


@pytest.mark.parametrize("check_seed", [0, 2])
def test_auto_does_not_alert_on_a_wide_clean_relu_network(check_seed: int) -> None:
    # A random direction with a step of eps on *every* element of a 200k-element tensor moves
    # the pre-activations by ~eps·√200k and crosses a ReLU kink almost surely: the sketch then
    # reads ~1e-3 on a correct backward. Directions must step ε in Euclidean length.
    model = wide_relu_mlp(seed=0)
    batch = classification_batch(64, 784, 10, seed=1)
    report = gradwatch.check_module(model, batch, cross_entropy_loss, seed=check_seed)
    assert "full" not in report.strategy
    assert report.evaluations <= 2000
    assert report.verdict == "ok", report.summary()
    sketch = gradwatch.check_module(
        model, batch, cross_entropy_loss, mode="sketch", include="*.weight", seed=check_seed
    )
    assert sketch.verdict == "ok", sketch.summary()
