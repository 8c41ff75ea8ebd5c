"""Independent references for the expert-cache tests (shared by test_serve_sim and test_simulate_policies)."""
from __future__ import annotations

import itertools


def brute_min_misses(seq, slots):
    """Fewest misses of any demand-loading cache (all subsets reachable), by dynamic programming."""
    states = {frozenset(): 0}
    for need in seq:
        need = frozenset(need)
        nxt = {}
        for s, cost in states.items():
            c = cost + len(need - s)
            pool = sorted(s - need)
            for r in range(0, slots - len(need) + 1):
                for keep in itertools.combinations(pool, min(r, len(pool))):
                    key = need | frozenset(keep)
                    if nxt.get(key, 1 << 30) > c:
                        nxt[key] = c
        states = nxt
    return min(states.values())
