"""gradwatch on a CUDA device: the planted-bug models checked on the GPU and on the CPU.

    python benchmarks/bench_gpu.py            # needs torch with CUDA; prints one table

For each model (clean and planted bugs, from tests/support/torch_models.py) `check_module`
runs on the model where it lives: once with the model on the CPU, once on the GPU. The
verdicts must agree, the located layer too, and the model, its gradients and the CUDA RNG
must be untouched. Seconds are wall time of one check (after one warm-up check on each device).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from tests.support.torch_models import big_bug_model, bug_model, mse_loss, regression_batch  # noqa: E402


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for p in model.parameters()
            for t in ([p] + ([p.grad] if p.grad is not None else []))]


def one(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
        device: str, **settings: object) -> tuple[str, str, float, float]:
    model = model.to(device)
    batch = (batch[0].to(device), batch[1].to(device))
    mse_loss(model, batch).backward()
    before = snapshot(model)
    rng = torch.cuda.get_rng_state_all() if device == "cuda" else None
    gradwatch.check_module(model, batch, mse_loss, **settings)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = gradwatch.check_module(model, batch, mse_loss, **settings)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    after = snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{name}: model changed"
    if rng is not None:
        assert all(torch.equal(a, b) for a, b in zip(rng, torch.cuda.get_rng_state_all()))
    worst = max(report.layers.items(), key=lambda kv: kv[1].rel_distance
                if kv[1].rel_distance == kv[1].rel_distance else float("inf"))[0]
    return report.verdict, worst, report.rel_distance, seconds


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    cases = [
        ("small clean", lambda: bug_model("none"), regression_batch(16, 4, 3), {"mode": "full"}),
        ("small scaled dW", lambda: bug_model("scaled"), regression_batch(16, 4, 3),
         {"mode": "full"}),
        ("small one_row", lambda: bug_model("one_row"), regression_batch(16, 4, 3),
         {"mode": "full"}),
        ("262k clean, auto", lambda: big_bug_model("none"), regression_batch(32, 512, 512),
         {"mode": "auto", "budget": 2000}),
        ("262k one_row, auto", lambda: big_bug_model("one_row"),
         regression_batch(32, 512, 512), {"mode": "auto", "budget": 2000}),
    ]
    print("| model | device | verdict | worst layer | distance | seconds |")
    print("|---|---|---|---|---:|---:|")
    failures = 0
    for name, make, batch, settings in cases:
        rows = {}
        for device in ("cpu", "cuda"):
            rows[device] = one(name, make(), batch, device, **settings)
            verdict, worst, distance, seconds = rows[device]
            print(f"| {name} | {device} | {verdict} | {worst} | {distance:.3e} | "
                  f"{seconds:.3f} |", flush=True)
        if rows["cpu"][:2] != rows["cuda"][:2]:
            failures += 1
            print(f"MISMATCH {name}: cpu {rows['cpu'][:2]} vs cuda {rows['cuda'][:2]}")
    print("verdicts and located layers agree on CPU and GPU" if not failures else
          f"{failures} cases disagree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
