"""Bad input gets a clear error (what was expected, what was got, how to fix it) and nothing
of the user's is modified."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import ConfigError, GradwatchError, InputError, LossError


def _quadratic() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    return {"W": w}, {"W": 2 * w}


def _cost(p: dict[str, np.ndarray]) -> float:
    return float(np.sum(p["W"] ** 2))


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"eps": 0.0}, ConfigError, ["eps", "> 0"]),
        ({"eps": -1e-7}, ConfigError, ["eps", "> 0"]),
        ({"eps": math.nan}, ConfigError, ["eps", "finite"]),
        ({"eps": 0.5}, ConfigError, ["eps", "1e-7"]),
        ({"mode": "fast"}, ConfigError, ["mode", "'full'", "'auto'", "'fast'"]),
        ({"budget": 3}, ConfigError, ["budget", "at least 4"]),
        ({"thresholds": {"warn": 1e-2, "alert": 1e-3}}, ConfigError, ["warn", "below", "alert"]),
        ({"thresholds": {"warn": -1.0, "alert": 1e-3}}, ConfigError, ["warn", "> 0"]),
        ({"thresholds": "strict"}, ConfigError, ["thresholds", "str"]),
    ],
)
def test_bad_settings_name_the_argument_and_the_fix(
    kwargs: dict, error: type[Exception], words: list[str]
) -> None:
    params, grads = _quadratic()
    with pytest.raises(error) as caught:
        gradwatch.check(_cost, params, grads, **kwargs)
    for word in words:
        assert word in str(caught.value)
    assert isinstance(caught.value, GradwatchError)


def test_key_mismatch_lists_expected_and_got() -> None:
    params, _ = _quadratic()
    with pytest.raises(InputError, match=r"no entry for params \['W'\].*got \['V'\]"):
        gradwatch.check(_cost, params, {"V": np.zeros((2, 2))})
    with pytest.raises(InputError, match="match no parameter"):
        gradwatch.check(_cost, params, {"W": np.zeros((2, 2)), "extra": np.zeros(1)})


def test_shape_mismatch_names_both_shapes() -> None:
    params, _ = _quadratic()
    with pytest.raises(InputError, match=r"shape \(2, 3\).*shape \(2, 2\)"):
        gradwatch.check(_cost, params, {"dW": np.zeros((2, 3))})


def test_integer_parameters_are_refused_with_the_cast_to_use() -> None:
    with pytest.raises(InputError, match=r"astype\(np.float64\)"):
        gradwatch.check(_cost, {"W": np.ones((2, 2), dtype=np.int64)}, {"W": np.ones((2, 2))})


def test_non_scalar_loss_says_how_to_reduce_it() -> None:
    params, grads = _quadratic()
    with pytest.raises(LossError, match=r"shape \(2, 2\).*\.mean\(\)"):
        gradwatch.check(lambda p: p["W"] ** 2, params, grads)


def test_cost_that_raises_is_wrapped_with_what_gradwatch_passed() -> None:
    params, grads = _quadratic()
    with pytest.raises(LossError, match=r"KeyError.*float64 arrays"):
        gradwatch.check(lambda p: p["missing"], params, grads)


# ---------------------------------------------------------------------- torch
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


BATCH = (
    torch.randn(5, 3, generator=torch.Generator().manual_seed(1)),
    torch.tensor([0, 1, 0, 1, 0]),
)


def test_a_module_without_loss_fn_and_a_tensor_batch_is_told_to_pass_loss_fn() -> None:
    with pytest.raises(LossError, match="loss_fn=lambda model, batch"):
        gradwatch.check_module(_mlp(), torch.randn(5, 3))


def test_tuple_batch_whose_output_is_not_a_loss() -> None:
    with pytest.raises(LossError, match=r"model\(\*batch\) returned Tensor of shape \[5, 2\]"):
        gradwatch.check_module(_mlp(), (torch.randn(5, 3),))


def test_batch_the_model_cannot_take() -> None:
    with pytest.raises(InputError, match=r"model\(\*batch\) failed.*\[5, 7\]"):
        gradwatch.check_module(_mlp(), (torch.randn(5, 7),))


def test_non_scalar_loss_from_loss_fn() -> None:
    with pytest.raises(LossError, match=r"shape \[5, 2\].*\.mean\(\)"):
        gradwatch.check_module(_mlp(), BATCH, lambda m, b: m(b[0]))


def test_loss_cut_off_from_autograd() -> None:
    with pytest.raises(LossError, match=r"Python float.*\.item\(\)"):
        gradwatch.check_module(_mlp(), BATCH, lambda m, b: _loss(m, b).item())
    with pytest.raises(LossError, match="does not require grad"):
        gradwatch.check_module(_mlp(), BATCH, lambda m, b: _loss(m, b).detach())


def test_model_without_trainable_parameters() -> None:
    model = _mlp().requires_grad_(False)
    with pytest.raises(InputError, match=r"no trainable parameters.*Unfreeze"):
        gradwatch.check_module(model, BATCH, _loss)


def test_include_and_exclude_that_match_nothing_list_the_names() -> None:
    with pytest.raises(ConfigError, match=r"leave no parameter.*0\.weight, 0\.bias"):
        gradwatch.check_module(_mlp(), BATCH, _loss, include="encoder.*")
    with pytest.raises(ConfigError, match="leave no parameter"):
        gradwatch.check_module(_mlp(), BATCH, _loss, exclude="*")


def test_not_a_module() -> None:
    with pytest.raises(InputError, match=r"torch.nn.Module.*gradwatch.check\(cost"):
        gradwatch.check_module(object(), BATCH, _loss)


def test_unknown_batching() -> None:
    with pytest.raises(ConfigError, match="batching"):
        gradwatch.check_module(_mlp(), BATCH, _loss, batching="gpu")


def test_a_parameter_the_loss_ignores_is_reported_not_a_crash() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithSpare()
    report = gradwatch.check_module(model, BATCH, _loss, mode="full")
    assert report.verdict == "ok", report.summary()
    layer = report.layers["unused.weight"]
    assert layer.rel_distance == 0.0
    assert any("does not depend" in note for note in layer.notes)
    assert report.probe["unused_parameters"] == ["unused.weight", "unused.bias"]


def test_include_and_exclude_select_tensors() -> None:
    report = gradwatch.check_module(_mlp(), BATCH, _loss, include="2.*", exclude="*.bias")
    assert list(report.layers) == ["2.weight"]


def test_errors_leave_the_model_untouched() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LossError):
        gradwatch.check_module(model, BATCH, lambda m, b: m(b[0]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
