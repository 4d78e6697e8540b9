import math

import pytest

from l2vit.analysis.stats import mean_ci


def test_mean_ci_known_values():
    # n = 3, s = 1: t_{0.975, 2} = 4.302653 -> half-width 4.302653 / sqrt(3)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3 and ci.std == pytest.approx(1.0)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([5.0, 5.0, 5.0]).half_width == 0.0
    assert mean_ci([1.0, 3.0], confidence=0.9).half_width == pytest.approx(6.313752 * math.sqrt(2) / math.sqrt(2))
    assert ci.format(1) == '2.0 ± 2.5'


def test_mean_ci_edge_cases():
    one = mean_ci([7.0])
    assert one.mean == 7.0 and math.isnan(one.half_width) and one.format() == '7.00'
    assert math.isnan(mean_ci([1.0, float('nan')]).mean)  # a diverged run is not averaged away
    with pytest.raises(ValueError, match='at least one'):
        mean_ci([])
    with pytest.raises(ValueError, match='confidence'):
        mean_ci([1.0, 2.0], confidence=95)
