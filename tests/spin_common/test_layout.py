"""layout: names exactly as docs/design.md spells them."""

from __future__ import annotations

import pytest

from spin_common.layout import RunLayout, shard_name


def test_run_layout_names() -> None:
    run = RunLayout.for_run("s3://bucket/spin/", "team-a", "zephyr-spin")
    assert run.prefix == "s3://bucket/spin/team-a/zephyr-spin"
    assert run.spec == "s3://bucket/spin/team-a/zephyr-spin/spinrun.yaml"
    it = run.iteration(0)
    r0 = "s3://bucket/spin/team-a/zephyr-spin/iter-000"
    assert it.prefix == r0 and it.index == 0
    assert it.generated == f"{r0}/generated"
    assert it.shard(0, 4) == f"{r0}/generated/shard-00000-of-00004.jsonl"
    assert it.shard_manifest(3, 4) == f"{r0}/generated/shard-00003-of-00004.manifest.json"
    assert it.model == f"{r0}/model"
    assert it.train_work == f"{r0}/train"
    assert it.epoch_checkpoint(1) == f"{r0}/train/epoch-001"
    assert it.eval == f"{r0}/eval"
    assert it.eval_results == f"{r0}/eval/results.json"
    assert it.tracking_spool == f"{r0}/tracking-spool"
    assert run.iteration(12).prefix.endswith("/iter-012")


def test_local_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = RunLayout.for_run(str(tmp_path), "default", "demo")
    assert run.iteration(1).model == f"{tmp_path}/default/demo/iter-001/model"


def test_models_and_training_data_per_iteration() -> None:
    run = RunLayout("s3://b-1/R")
    assert run.model_for_iteration(0, "hf-org/base") == "hf-org/base"
    assert run.model_for_iteration(1, "hf-org/base") == "s3://b-1/R/iter-000/model"
    assert run.model_for_iteration(3, "hf-org/base") == "s3://b-1/R/iter-002/model"
    gen = lambda t: f"s3://b-1/R/iter-{t:03d}/generated"  # noqa: E731
    assert run.training_data_for_iteration(0) == [gen(0)]
    assert run.training_data_for_iteration(1) == [gen(1), gen(0)]
    assert run.training_data_for_iteration(3, mix_previous=1) == [gen(3), gen(2)]
    assert run.training_data_for_iteration(3, mix_previous=0) == [gen(3)]
    assert run.training_data_for_iteration(2, mix_previous=5) == [gen(2), gen(1), gen(0)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: RunLayout.for_run("s3://bkt", "ns/x", "n"),
        lambda: RunLayout.for_run("s3://bkt", "ns", ""),
        lambda: RunLayout.for_run("gs://bkt", "ns", "n"),
        lambda: RunLayout("s3://bkt").iteration(-1),
        lambda: RunLayout("s3://bkt").iteration(0).epoch_checkpoint(0),
        lambda: shard_name(4, 4),
        lambda: shard_name(0, 0),
    ],
)
def test_bad_input_is_refused(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        call()
