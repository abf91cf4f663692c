"""Speed you can trust: identical models measured in interleaved rounds agree, on a fake clock (no real timing)."""

from __future__ import annotations

import pytest

from alambic.evaluate.speed import interleaved_seconds, interleaved_throughput, median_and_spread, spread_warnings


class LoadedMachine:
    """A fake clock: each call of a model costs `work` seconds times the machine's load at that moment.

    The load climbs steadily (another job starting), which is what made two identical
    students measure at 269.5 vs 132.1 examples/s when one was timed after the other.
    """

    def __init__(self, load_step: float = 0.01, bursts: dict[int, float] | None = None):
        self.now = 0.0
        self.calls = 0
        self.load_step = load_step
        self.bursts = bursts or {}

    def clock(self) -> float:
        return self.now

    def model(self, work: float):
        def run():
            load = 1.0 + self.load_step * self.calls + self.bursts.get(self.calls, 0.0)
            self.now += work * load
            self.calls += 1

        return run


def test_identical_models_agree_within_the_spread_when_interleaved():
    machine = LoadedMachine()
    runners = {"a": machine.model(1.0), "b": machine.model(1.0), "teacher": machine.model(5.0)}
    measured = interleaved_throughput(runners, batch_size=32, rounds=9, warmup=1, clock=machine.clock)
    a, b = measured["a"]["throughput_per_s"], measured["b"]["throughput_per_s"]
    assert abs(a / b - 1) <= 0.05
    assert abs(a / b - 1) <= max(measured["a"]["throughput_spread"], measured["b"]["throughput_spread"])
    assert measured["a"]["throughput_per_s"] / measured["teacher"]["throughput_per_s"] == pytest.approx(5.0, rel=0.05)


def test_timing_one_model_after_the_other_on_the_same_machine_does_not_agree():
    """The control: the same drift, measured sequentially, separates identical models (what interleaving fixes)."""
    machine = LoadedMachine()
    a = interleaved_seconds({"a": machine.model(1.0)}, rounds=9, warmup=1, clock=machine.clock)["a"]
    b = interleaved_seconds({"b": machine.model(1.0)}, rounds=9, warmup=1, clock=machine.clock)["b"]
    assert median_and_spread(b)[0] / median_and_spread(a)[0] > 1.08  # 10 calls later: 10% more load


def test_rounds_rotate_the_order_so_no_model_is_always_first():
    order = []
    runners = {name: (lambda name=name: order.append(name)) for name in "xyz"}
    interleaved_seconds(runners, rounds=3, warmup=0, clock=lambda: 0.0)
    timed_after_a_warm_call = ["x", "x", "y", "y", "z", "z", "y", "y", "z", "z", "x", "x", "z", "z", "x", "x", "y", "y"]
    assert order == timed_after_a_warm_call


class CacheMachine:
    """A fake clock where a call costs extra right after a larger model ran (it evicted the smaller one's caches)."""

    def __init__(self, cold_penalty: float):
        self.now, self.last_work, self.cold_penalty = 0.0, 0.0, cold_penalty

    def clock(self) -> float:
        return self.now

    def model(self, work: float):
        def run():
            self.now += work * (1.0 + (self.cold_penalty if self.last_work > work else 0.0))
            self.last_work = work

        return run


def test_the_model_listed_after_the_teacher_is_not_timed_on_cold_caches():
    """Rotation keeps the cyclic order (a always follows the teacher); the warm call keeps a equal to its twin."""
    machine = CacheMachine(cold_penalty=0.15)
    runners = {"teacher": machine.model(8.0), "a": machine.model(1.0), "b": machine.model(1.0)}
    measured = interleaved_throughput(runners, batch_size=32, rounds=9, warmup=1, clock=machine.clock)
    assert measured["a"]["throughput_per_s"] == pytest.approx(measured["b"]["throughput_per_s"], rel=1e-9)
    assert measured["a"]["throughput_per_s"] == pytest.approx(32.0)


def test_a_noisy_measurement_warns():
    machine = LoadedMachine(load_step=0.0, bursts={3: 2.0, 6: 2.5, 9: 3.0, 12: 2.0})
    measured = interleaved_throughput({"a": machine.model(1.0), "b": machine.model(1.0)}, 32, rounds=7,
                                      warmup=1, clock=machine.clock)
    quiet = LoadedMachine(load_step=0.0)
    steady = interleaved_throughput({"a": quiet.model(1.0)}, 32, rounds=7, warmup=1, clock=quiet.clock)
    assert steady["a"]["throughput_spread"] == 0 and not spread_warnings(steady)
    warned = spread_warnings(measured)
    assert warned and "spread" in warned[0]
