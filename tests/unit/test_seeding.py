"""utils/seeding.py: the run's random streams keep the values the project has always used, and do not collide."""

from megatron_opd.utils.seeding import derive_seed, evaluation_seed


def test_values_are_the_historical_ones():
    # A change here silently changes every run's data order and samples: resumed runs would not repeat.
    assert derive_seed(1234, 0) == 1234 * 1_000_003
    assert derive_seed(1234, 7) == 1234 * 1_000_003 + 7
    assert evaluation_seed(1234, 25) == 1234 + 17 * 25


def test_streams_are_distinct_and_in_range():
    seeds = {derive_seed(base, index) for base in (0, 1, 2, 1234) for index in range(1000)}
    assert len(seeds) == 4 * 1000
    assert 0 <= derive_seed(2**62, 5) < 2**63 and derive_seed(-3, 1) >= 0
