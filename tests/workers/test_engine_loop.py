"""The engine loop's periodic report: step rate, tokens per step, the ranks' share."""

from __future__ import annotations

from types import SimpleNamespace

from dist_infer.workers.engine_loop import LoopStats


def test_loop_stats_report_averages_over_the_steps_since_the_last_report():
    stats = LoopStats()
    assert not stats.due()  # no step yet: nothing to report, however long it has been
    stats.since -= LoopStats.interval_s  # ten seconds ago
    stats.add(0.010, 64, 0.008)
    stats.add(0.030, 192, 0.026)
    assert stats.due()
    engine = SimpleNamespace(stats=lambda: SimpleNamespace(running=64, waiting=3, kv_usage=0.25,
                                                           prefix_hit_rate=0.5))
    line = stats.report(engine)
    assert "128 tokens/step" in line and "step 20.00 ms (ranks 17.00 ms)" in line
    assert "running 64, waiting 3, KV 25%, prefix hits 50%" in line
    rate = float(line.split(" steps/s")[0])
    assert 0.1 < rate < 0.25  # 2 steps in a bit over 10 s
