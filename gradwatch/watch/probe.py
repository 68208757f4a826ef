"""The probe batch: the inputs of the most recent training forward pass, captured by reference.

Iterating the trainer's dataloader would consume its RNG (and, under Accelerate, trigger an RNG
sync collective), so gradwatch never does. Instead a forward pre-hook on the model keeps a
reference to the positional and keyword inputs of the latest forward made in training mode.
Nothing is copied at capture time; the check casts to float64 copies when it runs. The hook
also notes the autocast that training forward ran under (the training-kernels measurement
computes the gradient the same way); with `keep_inputs=False` (a fixed probe batch) that is
all it keeps.

Imports: engine.torch_model (deferred, for the loss of a captured call); torch when attached.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProbeCapture"]


class ProbeCapture:
    """A forward pre-hook (`with_kwargs=True`) that remembers the latest training inputs.

    A deep copy of the hook (when gradwatch copies the model for its float64 shadow) is an
    inert hook holding nothing, so the shadow neither drags the captured batch along nor
    records its own forwards.
    """

    def __init__(self, keep_inputs: bool = True) -> None:
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.active = True
        self.keep_inputs = keep_inputs
        #: The autocast dtype around the latest training forward ("bfloat16", "float16"),
        #: None without one; "auto" until a training forward is seen.
        self.autocast: str | None = "auto"
        self._handle: Any = None
        self._torch: Any = None

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.active and getattr(module, "training", True):
            if self.keep_inputs:
                self.args, self.kwargs = args, kwargs
            self.autocast = _autocast_now(self._torch)
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> ProbeCapture:
        inert = ProbeCapture()
        inert.active = False
        return inert

    def attach(self, model: Any) -> None:
        if self._handle is None:
            import torch

            self._torch = torch
            self._handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.args = self.kwargs = None

    @property
    def captured(self) -> bool:
        return self.args is not None

    def batch(self) -> tuple[Any, Any]:
        """The captured inputs as `(batch, default_loss)` for `check_module`.

        Keyword-only inputs (Hugging Face) → a dict, called as model(**batch); positional only →
        a tuple, model(*batch); both → {"args", "kwargs"} with a loss that calls
        model(*args, **kwargs). The loss is the output's `.loss` / ["loss"] or a scalar output.
        """
        if self.args is None:
            return None, None
        if not self.args:
            return dict(self.kwargs or {}), None
        if not self.kwargs:
            return tuple(self.args), None
        return {"args": self.args, "kwargs": dict(self.kwargs)}, _loss_of_call


def _autocast_now(torch: Any) -> str | None:
    """The autocast dtype enabled now (CUDA first, then CPU), as a name; None without one."""
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                return str(torch.get_autocast_dtype(device)).replace("torch.", "")
        except (TypeError, AttributeError, RuntimeError):  # torch < 2.4: no device argument
            return None
    return None


def _loss_of_call(model: Any, batch: dict[str, Any]) -> Any:
    from gradwatch.engine.torch_model import loss_of_output

    output = model(*batch["args"], **batch["kwargs"])
    return loss_of_output(output, "model(*args, **kwargs) on the captured training inputs")
