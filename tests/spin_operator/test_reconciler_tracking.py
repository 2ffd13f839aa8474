"""MLflow run ends and spool replays are part of reconciliation (pure reconciler, World).

The reconciler asks for a run's end (FinishTracking) and for spool replays (ReplaySpool) from the
status alone, on every pass, until `status.mlflow` records that MLflow confirmed them; the
executor (`Tracking.settle`, here over an in-memory MLflow that can be down) writes only what
MLflow confirmed. So neither an operator killed right after `Succeeded` nor an MLflow outage
leaves a run RUNNING in MLflow or spooled calls undelivered.
"""

from __future__ import annotations

from spin_operator.decision import FinishTracking, ReplaySpool
from tests.spin_operator.reconciler_world import World, spin_object

TRACKED = {"uri": "http://mlflow:5000"}


def world(**spec: object) -> World:
    return World(spin_object(tracking=TRACKED, **spec))


def finish_all_but_the_last_step(w: World, iterations: int) -> str:
    """Drive the run until only the evaluation of its last iteration runs; that Job's name."""
    for _ in range(100):
        w.reconcile()
        active = w.active()
        last = [j for j in active if j.iteration == iterations - 1 and j.stage == "evaluate"]
        if last:
            return last[0].name
        for job in active:
            w.succeed(job.name)
    raise AssertionError("never reached the last step")


def test_killed_right_after_succeeded_the_next_pass_ends_the_runs() -> None:
    w = world(iterations=2)
    w.succeed(finish_all_but_the_last_step(w, 2))
    d = w.reconcile(killed=True)  # Succeeded is written, then the operator dies
    assert d.status.phase == "Succeeded"
    assert w.mlflow.ended == {"iter-0": "FINISHED"}  # iteration 1 and the parent: never ended
    assert w.status.mlflow is not None and w.status.mlflow.finished == ["iter-0"]
    d = w.reconcile()  # the restarted operator's first pass
    assert (
        FinishTracking(1, "FINISHED") in d.actions and FinishTracking(None, "FINISHED") in d.actions
    )
    assert w.mlflow.ended == {"iter-0": "FINISHED", "iter-1": "FINISHED", "parent": "FINISHED"}
    assert sorted(w.status.mlflow.finished) == ["iter-0", "iter-1", "parent"]
    assert w.settled and not w.reconcile().of_type(FinishTracking)  # confirmed: asked no more


def test_run_ends_are_asked_for_while_mlflow_is_down() -> None:
    w = world(iterations=1)
    last = finish_all_but_the_last_step(w, 1)
    w.mlflow.up = False
    w.succeed(last)
    for _ in range(3):
        d = w.reconcile()
        assert d.status.phase == "Succeeded" and not w.settled
        assert (
            FinishTracking(0, "FINISHED") in d.actions
            and FinishTracking(None, "FINISHED") in d.actions
        )
        assert w.status.mlflow is not None and w.status.mlflow.finished == []
    w.mlflow.up = True
    d = w.reconcile()
    assert w.settled and sorted(w.status.mlflow.finished) == ["iter-0", "parent"]
    assert w.mlflow.ended == {"iter-0": "FINISHED", "parent": "FINISHED"}
    assert not w.reconcile().of_type(FinishTracking)


def test_spooled_calls_are_replayed_until_mlflow_takes_them_and_counted_meanwhile() -> None:
    w = world(iterations=1)
    w.reconcile()
    gen = w.active()[0]
    w.mlflow.up = False
    w.mlflow.spooled[0] = 7  # the generation Job spooled what it logged during the outage
    w.succeed(gen.name)
    d = w.reconcile()
    assert d.of_type(ReplaySpool) == [ReplaySpool((0,))] and not w.settled
    assert w.status.mlflow is not None and w.status.mlflow.spooled_calls is None  # not known yet
    w.mlflow.up = True
    d = w.reconcile()  # MLflow answers again while training runs: delivered now, not at the end
    assert d.of_type(ReplaySpool) and w.mlflow.delivered == 7 and w.settled
    assert w.mlflow.replay_run_ids == {
        "parent",
        "iter-0",
    }  # only the runs of this status (threat 3)
    assert w.status.mlflow.spooled_calls == 0
    assert not w.reconcile().of_type(ReplaySpool)  # nothing pending: no more replays
    assert w.status.phase == "Running" and "iter-0" not in w.mlflow.ended


def test_an_iteration_run_never_ends_before_its_spool_is_delivered() -> None:
    w = world(iterations=1)
    last = finish_all_but_the_last_step(w, 1)
    w.mlflow.spooled[0] = 3
    w.mlflow.up = False
    w.succeed(last)
    w.reconcile()
    assert w.mlflow.ended == {} and not w.settled
    w.mlflow.up = True
    w.reconcile()
    assert w.mlflow.delivered == 3 and w.mlflow.ended == {
        "iter-0": "FINISHED",
        "parent": "FINISHED",
    }
    assert w.status.mlflow is not None and w.status.mlflow.spooled_calls == 0


def test_a_failed_run_ends_its_unfinished_iteration_run_and_the_parent_as_failed() -> None:
    w = world(iterations=2, failurePolicy={"maxRetries": 0})
    w.past_the_check()
    w.reconcile()
    for _ in range(3):  # iteration 0 to its end
        for job in w.active():
            w.succeed(job.name)
        w.reconcile()
    gen = next(j for j in w.active() if j.iteration == 1)
    w.set_state(gen.name, "Failed", "BackoffLimitExceeded")
    d = w.reconcile()
    assert d.status.phase == "Failed"
    assert w.mlflow.ended == {"iter-0": "FINISHED", "iter-1": "FAILED", "parent": "FAILED"}


def test_no_run_ends_when_mlflow_never_gave_ids() -> None:
    w = world(iterations=1)
    w.mlflow.up = False  # down from the start: no parent run, so nothing to end later
    w.run_to_end()
    assert w.status.phase == "Succeeded" and w.status.mlflow is None
    d = w.reconcile()
    assert not d.of_type(FinishTracking) and not d.of_type(ReplaySpool) and w.settled
