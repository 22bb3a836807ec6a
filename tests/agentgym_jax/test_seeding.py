"""mix_seed: the one seed-derivation helper, checked against its arithmetic definition."""

from agentgym_jax.seeding import mix_seed


def test_mix_seed_matches_its_formula_and_separates_streams():
    p, m = 1_000_003, 2**31 - 1
    assert mix_seed(3) == 3
    assert mix_seed(3, 5) == (3 * p + 5) & m
    assert mix_seed(3, 5, 7) == (((3 * p + 5) & m) * p + 7) & m
    seeds = {mix_seed(s, k) for s in range(4) for k in range(1000)}
    assert len(seeds) == 4000 and all(0 <= x <= m for x in seeds)
    assert mix_seed(2**40, 2**40) >= 0
