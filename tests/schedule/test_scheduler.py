"""The scheduler on the embedded default (database queue), with nodes as in-process Applications ticked at chosen
times: one run per slot whatever the nodes, clocks and restarts; misfire policies; enable, disable, run now."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest

from nocluster import UnknownChannel
from nocluster.db import close_this_thread_connections
from nocluster.errors import UnknownJob
from nocluster.models import ScheduledJob, ScheduleRun
from nocluster.schedule import PeriodicJob
from tests.helpers import wait_until
from tests.schedule.conftest import Clock, NodeFactory, Project, at, job, run_all


def test_a_due_slot_is_claimed_once_and_its_message_runs(project: Project, make_node: NodeFactory) -> None:
    # Given a node that first sees the 1-second job at T0 (a new job starts after its latest slot)
    node = make_node()
    assert node.scheduler.tick(at(0.2)) == []

    # When the next slot passes, and the node ticks again within that second
    claimed = node.scheduler.tick(at(1.01))
    again = node.scheduler.tick(at(1.6))

    # Then it claimed slot T0+1 once, and its message ran with the slot in its payload
    assert [(run.slot, run.kind) for run in claimed] == [(at(1), "scheduled")] and again == []
    run_all(node)
    assert [(item["job"], item["slot"], item["kind"]) for item in project.ran.items] == [
        ("tick", at(1).isoformat(), "scheduled")
    ]
    run = ScheduleRun.objects.get(app_name=project.name)
    assert (run.outcome, run.message_id, run.node) == ("done", claimed[0].message_id, node.instance_id)
    assert run.finished_at is not None
    state = ScheduledJob.objects.get(app_name=project.name, name="tick")
    assert (state.last_slot, state.next_run, state.schedule, state.enabled) == (at(1), at(2), "every 1 s", True)


def test_three_nodes_ticking_together_claim_each_slot_exactly_once(project: Project, make_node: NodeFactory) -> None:
    # Given three nodes, the third with a clock 2 s ahead, ticking at the same instants (threads, every 0.25 s)
    nodes = [make_node(), make_node(), make_node()]
    offsets = [0.0, 0.0, 2.0]
    claimed: Counter[int] = Counter()
    nodes[0].scheduler.tick(at(0))  # the job's row: it starts after T0

    def together(indexes: list[int], steps: range) -> None:
        barrier = threading.Barrier(len(indexes))

        def run(index: int) -> None:
            try:
                for step in steps:
                    barrier.wait(10)
                    claimed[index] += len(nodes[index].scheduler.tick(at(step / 4 + offsets[index])))
            finally:
                close_this_thread_connections()  # this thread's own connection, not left to the garbage collector

        threads = [threading.Thread(target=run, args=(index,)) for index in indexes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    # When all three tick for 10 s, the ahead node is down for 5 s (the other two race for each slot), and it
    # comes back as a new process (nothing in memory) for 5 s more
    together([0, 1, 2], range(1, 41))
    together([0, 1], range(41, 61))
    nodes[2] = make_node()
    together([0, 1, 2], range(61, 81))

    # Then every slot from T0+1 to the ahead node's last (T0+22) was claimed exactly once, on time
    assert [run.slot for run in project.runs()] == [at(second) for second in range(1, 23)]
    assert {run.kind for run in project.runs()} == {"scheduled"}
    # The ahead node claimed whenever it was up (it is always first): T0+1..12 and, back, T0+16..22 (two at once);
    # the two others the three slots of its absence between them
    assert claimed[2] == 12 + 7 and claimed[0] + claimed[1] == 3


def test_a_node_that_paused_claims_the_slots_it_missed_within_the_grace(
    project: Project, make_node: NodeFactory
) -> None:
    # Given a node alone that stalls for 3 s (less than the 5 s grace)
    node = make_node()
    node.scheduler.tick(at(0))
    node.scheduler.tick(at(1))

    # When it ticks again
    claimed = node.scheduler.tick(at(4.5))

    # Then the three slots that passed meanwhile run, in order: none is lost
    assert [(run.slot, run.kind) for run in claimed] == [(at(second), "scheduled") for second in (2, 3, 4)]


def test_a_restarted_node_goes_on_from_the_state_in_the_database(project: Project, make_node: NodeFactory) -> None:
    # Given a node that claimed up to T0+5, then stopped
    first = make_node()
    for second in range(6):
        first.scheduler.tick(at(second))
    first.scheduler.stop()

    # When a new process of the same project ticks within the same second, and the next
    restarted = make_node()
    same_second = restarted.scheduler.tick(at(5.5))
    next_second = restarted.scheduler.tick(at(6))

    # Then it claims nothing twice and goes on with the next slot
    assert same_second == [] and [run.slot for run in next_second] == [at(6)]
    assert [run.slot for run in project.runs()] == [at(second) for second in range(1, 7)]


@pytest.mark.parametrize("misfire", ["skip", "once"])
def test_after_every_node_was_down_skip_runs_no_missed_slot_and_once_runs_one(
    project: Project, make_node: NodeFactory, misfire: str
) -> None:
    # Given a job that ran up to T0+3, then every node down for 37 s (grace 5 s)
    node = make_node(job(misfire=misfire))
    for second in range(4):
        node.scheduler.tick(at(second))

    # When a node starts again at T0+40
    claimed = node.scheduler.tick(at(40))

    # Then the slots within the grace run as usual; the 31 older ones do not, or run once as one catch-up run,
    # claimed as the first missed slot and saying how many it stands for
    on_time = [(at(second), "scheduled", 0) for second in range(35, 41)]
    catch_up = [(at(4), "catch-up", 31)] if misfire == "once" else []
    assert [(run.slot, run.kind, run.missed) for run in claimed] == catch_up + on_time
    run_all(node)
    kinds = Counter(item["kind"] for item in project.ran.items)
    assert kinds == Counter({"scheduled": 3 + 6, **({"catch-up": 1} if misfire == "once" else {})})
    if misfire == "once":
        assert [item["missed"] for item in project.ran.items if item["kind"] == "catch-up"] == [31]


def test_two_nodes_waking_after_downtime_claim_the_same_single_catch_up(
    project: Project, make_node: NodeFactory
) -> None:
    # Given a "once" job that ran up to T0+3, and a node that woke at T0+40 and caught up
    first = make_node(job(misfire="once"))
    for second in range(4):
        first.scheduler.tick(at(second))
    first.scheduler.tick(at(40))

    # When a second node wakes at T0+43 having read the job's state from before the first one's commit
    ScheduledJob.objects.filter(app_name=project.name).update(last_slot=at(3))
    second = make_node(job(misfire="once"))
    claimed = second.scheduler.tick(at(43))

    # Then it derives the same catch-up slot, finds it taken, and claims only the slots nobody had
    assert [run.slot for run in claimed] == [at(41), at(42), at(43)]
    assert [run.slot for run in project.runs(kind="catch-up")] == [at(4)]
    assert Counter(run.slot for run in project.runs()).most_common(1)[0][1] == 1


def test_a_disabled_job_claims_nothing_and_resumes_at_its_next_slot_without_catching_up(
    project: Project, make_node: NodeFactory
) -> None:
    # Given a "once" job, disabled at T0+2.5 after two runs
    clock = Clock(at(0))
    node = make_node(job(misfire="once"), clock=clock)
    for second in range(3):
        node.scheduler.tick(at(second))
    clock.now = at(2.5)
    node.scheduler.disable("tick")

    # When its slots pass for 20 s, and it is enabled again at T0+22.5
    disabled = [run for second in range(3, 23) for run in node.scheduler.tick(at(second))]
    clock.now = at(22.5)
    node.scheduler.enable("tick")
    resumed = node.scheduler.tick(at(23))

    # Then nothing ran while disabled, and it resumed with the next slot: no catch-up for the disabled time
    assert disabled == []
    assert [(run.slot, run.kind) for run in resumed] == [(at(23), "scheduled")]
    assert [run.slot for run in project.runs()] == [at(1), at(2), at(23)]


def test_run_now_publishes_one_manual_run_even_when_disabled(project: Project, make_node: NodeFactory) -> None:
    # Given a disabled job
    node = make_node(clock=Clock(at(0.5)))
    node.scheduler.tick(at(0.5))
    node.scheduler.disable("tick")

    # When it is run by hand
    run = node.scheduler.run_now("tick")

    # Then one message ran, recorded as a manual run without a slot; the job's slots are untouched
    run_all(node)
    assert (run.kind, run.slot, run.node) == ("manual", None, node.instance_id)
    assert [(item["kind"], item["slot"], item["message_id"]) for item in project.ran.items] == [
        ("manual", None, run.message_id)
    ]
    assert ScheduleRun.objects.get(pk=run.pk).outcome == "done"
    state = ScheduledJob.objects.get(app_name=project.name, name="tick")
    assert (state.enabled, state.last_slot) == (False, at(0))


def test_a_job_whose_message_fails_shows_failed_with_its_error(project: Project, make_node: NodeFactory) -> None:
    # Given a job whose handler raises, tried twice
    project.ran.fail_with = "the report server is down"
    node = make_node(job(max_retries=1))
    node.scheduler.tick(at(0))
    node.scheduler.tick(at(1))

    # When its message has run
    run_all(node)

    # Then the run is failed, with the error, after both tries
    run = ScheduleRun.objects.get(app_name=project.name)
    assert run.outcome == "failed" and "the report server is down" in run.error
    assert len(project.ran.items) == 2


def test_a_job_on_a_channel_nobody_subscribed_stops_the_node_from_starting(make_node: NodeFactory) -> None:
    node = make_node(PeriodicJob("orphan", channel="nowhere", every=60))
    with pytest.raises(UnknownChannel, match=r"periodic job 'orphan'.*'nowhere'"):
        node.scheduler.start()


def test_an_unknown_job_is_named_in_the_error(make_node: NodeFactory) -> None:
    node = make_node()
    with pytest.raises(UnknownJob, match=r"periodic job 'nightly' is not declared.*known: \['tick'\]"):
        node.scheduler.run_now("nightly")


def test_a_job_declared_twice_differently_is_refused(make_node: NodeFactory) -> None:
    node = make_node()
    node.scheduler.add(job())  # the same declaration again: nothing changes
    with pytest.raises(ValueError, match="'tick' is declared twice"):
        node.scheduler.add(job(every=2.0))


def test_a_cron_job_runs_on_the_seconds_its_expression_names(project: Project, make_node: NodeFactory) -> None:
    node = make_node(PeriodicJob("even", channel="tick", cron="*/2 * * * * *"))
    claimed = [run.slot for second in range(0, 9) for run in node.scheduler.tick(at(second + 0.1))]
    assert claimed == [at(1), at(3), at(5), at(7)]  # T0 is on an odd second (:07): its even ones are T0+1, +3...


def test_old_runs_are_pruned_but_the_latest_of_each_job_stays(project: Project, make_node: NodeFactory) -> None:
    # Given runs of two jobs: every second up to T0+60, and every minute (its slot at T0+53, on the minute)
    node = make_node(job("tick"), job("tock", every=60.0))
    for moment in (0, 1, 2, 3, 53.5, 60):
        node.scheduler.tick(at(moment))
    assert len(project.runs(job="tock")) == 1 and len(project.runs(job="tick")) > 10

    # When a node ticks a week later (keep: 7 days)
    later = at(60) + timedelta(days=7, minutes=2)
    node.scheduler.tick(later)

    # Then the old runs are gone, but the latest of the job that has not run since stays (its outcome is shown)
    kept = {(run.job, run.slot) for run in project.runs() if run.claimed_at < later}
    assert kept == {("tock", at(53))}
    assert project.runs(job="tick") and all(run.claimed_at == later for run in project.runs(job="tick"))


def test_the_thread_claims_slots_on_the_real_clock_until_the_node_stops(
    project: Project, make_node: NodeFactory
) -> None:
    # Given a node whose scheduler runs its own thread
    node = make_node(ENABLED=True)
    node.start()

    # When it runs for two slots, then stops
    wait_until(lambda: len(project.runs()) >= 2, timeout=10, message="two runs claimed by the thread")
    node.stop()

    # Then the runs came one per slot, and no scheduler thread is left
    slots = [run.slot for run in project.runs()]
    assert slots[1] - slots[0] == timedelta(seconds=1)
    assert not [thread for thread in threading.enumerate() if thread.name == "nocluster-scheduler"]


def test_only_the_configured_roles_claim_slots(make_node: NodeFactory) -> None:
    # Celery pool processes ("worker") track outcomes but do not claim: the web and node processes do
    node = make_node(ENABLED=True)
    node.identity.role = "worker"
    node.scheduler.start()
    assert not node.scheduler.claims_here and node.scheduler._thread is None
