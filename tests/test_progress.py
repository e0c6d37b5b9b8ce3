"""Long phases say how far they are and how long is left, in a log as well as on a terminal."""

from torchslim import log
from torchslim.quantize.fallback import fallback, sensitivity


def test_steps_log_the_time_left_and_the_one_fallback_loop_stops_when_good_enough(monkeypatch):
    said = []
    monkeypatch.setattr(log.console, "log", lambda *a, **k: said.append(" ".join(map(str, a))))
    clock = iter(range(0, 1000, 40))  # every step "takes" 40 s
    monkeypatch.setattr(log.time, "perf_counter", lambda: next(clock))
    costs = sensitivity(["a", "b", "c", "d"], {"a": 0.1, "b": 0.5, "c": 0.0, "d": 0.3}.get, "int8")
    assert costs == {"a": 0.1, "b": 0.5, "c": 0.0, "d": 0.3}
    assert any("int8: sensitivity of each node alone: 1/4 done, about" in s and "left" in s for s in said)
    assert any("4 step(s) in" in s for s in said)
    order = sorted(costs, key=lambda n: -costs[n])
    built = []
    excluded, value = fallback(
        order,
        lambda ex: built.append(list(ex)) or ex,
        lambda ex: 1 - sum(costs[n] for n in "abcd" if n not in ex),
        lambda v: v >= 0.85,
    )
    assert excluded == ["b", "d"] and abs(value - 0.9) < 1e-9  # the costliest nodes went back to float, no more
    assert built == [[], ["b"], ["b", "d"]]
    excluded, _ = fallback(order, lambda ex: ex, lambda ex: 0.0, lambda v: False, start=["c"])
    assert excluded == ["c", "b", "d", "a"]  # never good enough: everything ends in float, start kept first
