"""FSDP2 (`fully_shard`) and FSDP1 under GradWatch and check_module: 2 CPU processes (gloo).

The HF zoo's tiny LLaMA, each decoder layer and the root sharded over both ranks. At a check
every rank takes part: the shards are gathered for rank 0's float64 check of an unsharded copy
("gathered" strategy, `gradwatch.engine.sharded`). Training stays bit-identical; a planted bug
is named by its fully-qualified name; a rank that fails or stalls inside a check makes the
check "error" on both ranks and never hangs (every scenario runs under a hard timeout).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.fsdp_worker import BUG
from tests.support.mlflow_server import MlflowServer
from tests.support.ranks import run_ranks, same_weights

WORKER = "tests.support.fsdp_worker"



@pytest.mark.slow
def test_fsdp2_training_is_unchanged_and_a_clean_model_reads_ok_at_every_check(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"fsdp2-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    zero, one = run_ranks(tmp_path, "same", {"MLFLOW_TRACKING_URI": mlflow_server.url,
                                             "MLFLOW_RUN_ID": run_id}, worker=WORKER)
    for rank in (zero, one):  # bit-identical with and without gradwatch, on each rank
        assert same_weights(rank["plain"]["weights"], rank["watched"]["weights"])
        assert rank["plain"]["losses"] == rank["watched"]["losses"]
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])
    checked = zero["watched"]["checked"]
    assert [step for step, *_ in checked] == list(range(1, 13))  # 12 checks, every=1
    assert {verdict for _, verdict, *_ in checked} == {"ok"}, [c[2] for c in checked]
    assert all(sharding["strategy"] == "gathered" and "available" in sharding["why"]
               for *_, sharding in checked)
    assert one["watched"]["checked"] == []  # only rank 0 checks and records
    layers = {key for key in client.get_run(run_id).data.metrics
              if key.startswith("gradwatch/layer/")}
    assert layers and all("_fsdp" not in key and "DTensor" not in key for key in layers)


@pytest.mark.slow
def test_a_planted_backward_bug_under_fsdp2_alerts_naming_its_parameter(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "bug", worker=WORKER)
    checked = zero["watched"]["checked"]
    assert [(step, verdict) for step, verdict, *_ in checked] == [
        (1, "alert"), (3, "alert"), (6, "alert"), (9, "alert"), (12, "alert")]
    assert all(worst[0] == BUG and f"layer '{BUG}'" in reasons
               for _, _, reasons, worst, _ in checked)
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])


@pytest.mark.slow
def test_a_rank_failing_inside_a_check_makes_it_an_error_on_both_ranks(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "fail", worker=WORKER)
    verdicts = [(step, verdict) for step, verdict, *_ in zero["watched"]["checked"]]
    assert verdicts == [(1, "ok"), (3, "error"), (6, "ok"), (9, "ok"), (12, "ok")]
    [(step, verdict, reasons, *_)] = one["watched"]["checked"]
    assert (step, verdict) == (3, "error")
    for text in (reasons, zero["watched"]["checked"][1][2]):
        assert "rank 1: MemoryError: rank 1 ran out of host memory" in text
    assert len(zero["watched"]["losses"]) == len(one["watched"]["losses"]) == 12
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])


@pytest.mark.slow
def test_a_rank_stalling_inside_a_check_times_out_on_both_and_nothing_hangs(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "stall", worker=WORKER)
    verdicts = [(step, verdict) for step, verdict, *_ in zero["watched"]["checked"]]
    assert verdicts == [(1, "ok"), (3, "error"), (6, "ok"), (9, "ok"), (12, "ok")]
    assert "timeout 3 s" in zero["watched"]["checked"][1][2]
    assert [(step, verdict) for step, verdict, *_ in one["watched"]["checked"]] == [
        (3, "error")]
    assert len(zero["watched"]["losses"]) == len(one["watched"]["losses"]) == 12


@pytest.mark.slow
def test_check_module_on_fsdp2_is_a_collective_that_gives_every_rank_the_report(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "check_module", worker=WORKER)
    assert zero["clean"] == one["clean"] and zero["clean"][0] == "ok"
    assert zero["buggy"] == one["buggy"] and zero["buggy"][0] == "alert"
    assert zero["buggy"][1] == BUG


@pytest.mark.slow
def test_fsdp1_is_gathered_by_summon_full_params_unchanged_and_names_the_bug(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "fsdp1", worker=WORKER)
    for rank in (zero, one):  # FSDP1's flat parameters: still bit-identical training
        assert same_weights(rank["plain"]["weights"], rank["watched"]["weights"])
        assert rank["plain"]["losses"] == rank["watched"]["losses"]
    clean, buggy = zero["watched"]["checked"], zero["bug"]["checked"]
    assert [(step, verdict) for step, verdict, *_ in clean] == [
        (1, "ok"), (3, "ok"), (6, "ok"), (9, "ok"), (12, "ok")]
    assert all(sharding["kind"] == "fsdp1" for *_, sharding in clean + buggy)
    assert {verdict for _, verdict, *_ in buggy} == {"alert"}
    # the user's names, not FSDP1's (_fsdp_wrapped_module, _flat_param)
    assert all(worst[0] == BUG for _, _, _, worst, _ in buggy)
    assert one["watched"]["checked"] == one["bug"]["checked"] == []


@pytest.mark.slow
def test_the_collective_strategy_checks_in_place_unchanged_and_names_the_bug(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """No rank gathers: each perturbs its own shards of a float64 FSDP2 twin; the loss goes
    through the sharded forward; the projections are all-reduced."""
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"coll-{tmp_path.name}")).info.run_id
    zero, one = run_ranks(tmp_path, "collective", {"MLFLOW_TRACKING_URI": mlflow_server.url,
                                                   "MLFLOW_RUN_ID": run_id}, worker=WORKER)
    for rank in (zero, one):
        assert same_weights(rank["plain"]["weights"], rank["watched"]["weights"])
        assert rank["plain"]["losses"] == rank["watched"]["losses"]
    clean, buggy = zero["watched"]["checked"], zero["bug"]["checked"]
    assert [step for step, *_ in clean] == list(range(1, 13))
    assert {verdict for _, verdict, *_ in clean} == {"ok"}, [c[2] for c in clean]
    assert all(s["strategy"] == "collective" and s["precision"] == "float64"
               for *_, s in clean + buggy)
    assert [(step, verdict) for step, verdict, *_ in buggy] == [
        (1, "alert"), (3, "alert"), (6, "alert"), (9, "alert"), (12, "alert")]
    assert all(worst[0] == BUG and f"localised to {BUG}" in reasons
               for _, _, reasons, worst, _ in buggy)
    # every rank computed the same report from the all-reduced values; only rank 0 records
    assert [c[:2] for c in one["bug"]["checked"]] == [c[:2] for c in buggy]
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])  # and across ranks
    metrics = client.get_run(run_id).data.metrics  # rank 0's record, the user's names
    assert f"gradwatch/layer/{BUG}" in metrics
    assert all("_fsdp" not in key and "DTensor" not in key for key in metrics)


@pytest.mark.slow
def test_a_rank_failing_inside_a_collective_check_makes_it_an_error_on_both(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "collective_fail", worker=WORKER)
    for rank in (zero, one):
        checked = rank["watched"]["checked"]
        assert [(step, verdict) for step, verdict, *_ in checked] == [
            (1, "ok"), (3, "error"), (6, "ok"), (9, "ok"), (12, "ok")]
        assert "rank 1: MemoryError: rank 1 ran out of memory" in checked[1][2]
        assert len(rank["watched"]["losses"]) == 12
    assert same_weights(zero["watched"]["weights"], one["watched"]["weights"])


@pytest.mark.slow
def test_check_module_collective_gives_every_rank_the_same_report(tmp_path: Path) -> None:
    zero, one = run_ranks(tmp_path, "collective_check_module", worker=WORKER)
    for name in ("clean", "buggy"):  # built from all-reduced values: the same on both ranks
        assert [zero[name][key] for key in ("verdict", "reasons", "rel_distance", "evaluations")
                ] == [one[name][key] for key in ("verdict", "reasons", "rel_distance",
                                                 "evaluations")]
    clean, buggy = zero["clean"], zero["buggy"]
    assert clean["untouched"] and buggy["untouched"]  # shards and .grad restored bit for bit
    assert clean["verdict"] == "ok" and clean["precision"]["evaluations"] == "float64"
    assert clean["precision"]["resolution"] < clean["thresholds"]["warn"]
    assert buggy["verdict"] == "alert"
    assert max(buggy["layers"].items(), key=lambda kv: kv[1]["rel_distance"]
               if kv[1]["rel_distance"] == kv[1]["rel_distance"] else -1)[0] == BUG
    assert buggy["coverage"]["localised"] == 1


@pytest.mark.slow
def test_without_a_float64_twin_the_collective_check_says_error_never_ok(
    tmp_path: Path
) -> None:
    """No rank can build the twin: the evaluations run in place in float32, whose resolution
    (≈ 0.1 on this model) cannot see the alert threshold: "error", with why; the live shards
    and gradients are restored bit for bit."""
    zero, one = run_ranks(tmp_path, "collective_float32", worker=WORKER)
    for rank in (zero, one):
        for name in ("clean", "buggy"):
            report = rank[name]
            assert report["verdict"] == "error"
            assert report["precision"]["evaluations"] == "float32"
            assert report["precision"]["resolution"] > report["thresholds"]["alert"]
            assert "no float64 twin" in report["probe"]["sharding"]["precision"]
            assert "not judged" in report["reasons"][0]
            assert report["untouched"]


@pytest.mark.slow
def test_auto_takes_the_collective_strategy_when_rank_0_cannot_hold_the_copy(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "auto_collective", worker=WORKER)
    checked = zero["watched"]["checked"]
    assert {verdict for _, verdict, *_ in checked} == {"alert"}
    for *_, worst, sharding in checked:
        assert worst[0] == BUG
        assert sharding["strategy"] == "collective"
        assert "0.5 MiB available: does not fit, collective" in sharding["why"]
    assert [c[:2] for c in one["watched"]["checked"]] == [c[:2] for c in checked]


@pytest.mark.slow
def test_collective_checks_run_on_the_inputs_each_rank_captured(tmp_path: Path) -> None:
    """step(model, None) on every rank (as the HF Trainer's callback calls it): each rank
    checks on the inputs of its own latest training forward; the first check waits on every
    rank until each has seen one."""
    zero, one = run_ranks(tmp_path, "collective_captured", worker=WORKER)
    checked = zero["watched"]["checked"]
    assert [(step, verdict) for step, verdict, *_ in checked] == [
        (3, "alert"), (6, "alert"), (9, "alert"), (12, "alert")]
    assert all(worst[0] == BUG for *_, worst, _ in checked)
    assert [c[:2] for c in one["watched"]["checked"]] == [c[:2] for c in checked]


@pytest.mark.slow
def test_a_rank_stalling_in_a_collective_check_times_out_on_both_and_nothing_hangs(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "collective_stall", worker=WORKER)
    for rank in (zero, one):
        checked = rank["watched"]["checked"]
        assert [(step, verdict) for step, verdict, *_ in checked] == [
            (1, "ok"), (3, "error"), (6, "ok"), (9, "ok"), (12, "ok")]
        assert "timeout 3 s" in checked[1][2]
        assert len(rank["watched"]["losses"]) == 12


@pytest.mark.slow
def test_on_alert_stop_stops_every_rank_at_the_same_step_with_either_strategy(
    tmp_path: Path
) -> None:
    zero, one = run_ranks(tmp_path, "stop", worker=WORKER)
    for strategy in ("gathered", "collective"):
        assert len(zero[strategy]["losses"]) == len(one[strategy]["losses"]) == 1
        assert [(step, verdict) for step, verdict, *_ in zero[strategy]["checked"]] == [
            (1, "alert")]


@pytest.mark.slow
def test_the_collective_twin_runs_batchnorm_in_float64(tmp_path: Path) -> None:
    """Buffers come to the twin in float64 like its parameters: an eval-mode BatchNorm mixes
    its running statistics with float64 activations (a float32 buffer would make the twin
    fail and the check fall back to float32, where it cannot judge)."""
    zero, one = run_ranks(tmp_path, "collective_batchnorm", worker=WORKER)
    for rank in (zero, one):
        report = rank["report"]
        assert report["probe"]["sharding"]["precision"] == "float64", report["reasons"]
        assert report["verdict"] == "ok", report["reasons"]
