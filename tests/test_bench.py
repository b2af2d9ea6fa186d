import numpy as np
import pytest

from rvdeploy.bench import Latency, measure


def test_statistics_of_a_known_series():
    samples = np.arange(1, 101, dtype=float)  # 1..100 ms
    stats = Latency.from_samples(samples, batch=4)
    assert (stats.iterations, stats.min, stats.mean) == (100, 1.0, 50.5)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.throughput_ips == pytest.approx(4 * 1000 / 50.5)


def test_outliers_move_the_tail_not_the_median():
    samples = [10.0] * 95 + [100.0] * 5
    stats = Latency.from_samples(samples, batch=1)
    assert stats.p50 == 10.0 and stats.p90 == 10.0 and stats.p99 == 100.0
    assert stats.mean == pytest.approx(14.5)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [0.0, 1.0], [-1.0]])
def test_rejects_meaningless_series(bad):
    with pytest.raises(ValueError):
        Latency.from_samples(bad, batch=1)


def test_measure_honours_the_iteration_floor():
    calls = []
    stats = measure(lambda: calls.append(1), batch=2, warmup_s=0.0, min_s=0.0, min_iters=25)
    assert stats.iterations == 25 and len(calls) >= 25 and stats.batch == 2
