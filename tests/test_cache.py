"""Tests for cache.py: the simulator against a brute-force replay written from the rules of
cache.SimOptions, Belady against an exhaustive search for the optimum, LRU against the plain-list
oracle of tests/oracles.py, and the shared counts (cache.Counts) worked by hand.

Worked by hand (LRU, capacity 2, K = 2, one MoE layer, cold start), the step rule at work:

    t0 needs [0, 1]: both miss                                   cache {0, 1}, 1 most recent
    t1 needs [2, 0]: 0 hits; 2 evicts 1, the least recent expert t1 does not need -> {0, 2}
    t2 needs [1, 2]: 2 hits; 1 evicts 0                                         -> {2, 1}
    2 hits of 6 requests.

Looked up independently (together=False), t1's 2 evicts 0 (least recent) and 0 then misses and
evicts 1; t2's 1 evicts 2 and 2 evicts 0: 0 hits of 6.
"""
import itertools
import math
import random

import pytest
import torch

import cache
from oracles import lru_hits

# ----------------------------------------------------------------------------------------------
# brute-force references: lists and linear scans, one global clock, the future scanned on demand


def brute_force(trace, policy, capacity, scope="layer", warmup=0, together=True):
    """Replays one sequence; returns (hits, misses) as lists of per-layer lists, counted steps only."""
    L = len(trace[0])
    cap = capacity if scope == "layer" else capacity * L
    accesses = []  # the whole future: (pool, item) in the order they happen
    for step in trace:
        for l, tokens in enumerate(step):
            needed = []
            for token in tokens:
                for e in token:
                    if e not in needed:
                        needed.append(e)
            accesses.extend((l if scope == "layer" else 0, e if scope == "layer" else (l, e)) for e in needed)
    held = {}  # pool -> list of items
    last, count = {}, {}
    clock = 0
    hits_out, misses_out = [], []
    for s, step in enumerate(trace):
        row_h, row_m = [], []
        for l, tokens in enumerate(step):
            pool = l if scope == "layer" else 0
            cached = held.setdefault(pool, [])
            needed = []
            for token in tokens:
                for e in token:
                    if e not in needed:
                        needed.append(e)
            items = needed if scope == "layer" else [(l, e) for e in needed]
            keep = set(items) if together and len(items) <= cap else set()
            h = 0
            for item in items:
                assert accesses[clock] == (pool, item)
                if item in cached:
                    h += 1
                else:
                    if len(cached) == cap:
                        candidates = [x for x in cached if x not in keep]

                        def next_use(x):
                            for q in range(clock + 1, len(accesses)):
                                if accesses[q] == (pool, x):
                                    return q
                            return math.inf

                        if policy == "lru":
                            victim = min(candidates, key=lambda x: last[pool, x])
                        elif policy == "lfu":
                            victim = min(candidates, key=lambda x: (count[pool, x], last[pool, x]))
                        else:
                            victim = min(candidates, key=lambda x: (-next_use(x), last[pool, x]))
                        cached.remove(victim)
                    cached.append(item)
                    assert len(cached) <= cap
                last[pool, item] = clock
                count[pool, item] = count.get((pool, item), 0) + 1
                clock += 1
            row_h.append(h)
            row_m.append(len(items) - h)
        if s >= warmup:
            hits_out.append(row_h)
            misses_out.append(row_m)
    return hits_out, misses_out


def optimal_misses(requests, capacity):
    """Fewest misses any policy could get, by exhaustive search over cache contents: requests is a
    list of sets that must all be cached at once (a set larger than the cache is split into single
    requests, as the streaming rule does)."""
    flat = []
    for r in requests:
        flat.extend([r] if len(r) <= capacity else [[e] for e in r])
    states = {frozenset(): 0}
    for r in flat:
        r = frozenset(r)
        new = {}
        for state, cost in states.items():
            # keep any subset of the old content that fits next to r; load what r lacks
            others = sorted(state - r)
            room = capacity - len(r)
            for n in range(min(room, len(others)) + 1):
                for kept in itertools.combinations(others, n):
                    s = r | frozenset(kept)
                    c = cost + len(r - state)
                    if c < new.get(s, math.inf):
                        new[s] = c
        states = new
    return min(states.values())


def random_trace(seed, steps=24, L=2, E=8, K=2, locality=0.6, prefill=0):
    """A sequence with some reuse: each slot repeats one of the previous token's experts with
    probability `locality`. With prefill > 0 the first step is a prompt of that many tokens."""
    rng = random.Random(seed)
    prev = [rng.sample(range(E), K) for _ in range(L)]
    trace = []
    for s in range(steps):
        step = []
        for l in range(L):
            tokens = []
            for _ in range(prefill if s == 0 and prefill else 1):
                chosen = []
                while len(chosen) < K:
                    e = rng.choice(prev[l]) if rng.random() < locality else rng.randrange(E)
                    if e not in chosen:
                        chosen.append(e)
                tokens.append(chosen)
                prev[l] = chosen
            step.append(tokens)
        trace.append(step)
    return trace


# ----------------------------------------------------------------------------------------------
# policies and the simulator


def test_worked_example():
    trace = [[[[0, 1]]], [[[2, 0]]], [[[1, 2]]]]  # 3 steps, 1 layer, 1 token of K=2
    r = cache.simulate([trace], "lru", 2)
    assert r.hits[:, 0].tolist() == [0, 1, 1] and r.misses[:, 0].tolist() == [2, 1, 1]
    assert r.hit_rate == pytest.approx(2 / 6)
    r = cache.simulate([trace], "lru", 2, cache.SimOptions(together=False))
    assert r.hits.sum().item() == 0


@pytest.mark.parametrize("policy", cache.POLICIES)
@pytest.mark.parametrize("scope,warmup,together,prefill", [
    ("layer", 0, True, 0), ("layer", 3, True, 0), ("layer", 0, False, 0), ("global", 0, True, 0),
    ("layer", 1, True, 5), ("global", 2, False, 4)])
def test_simulator_matches_brute_force(policy, scope, warmup, together, prefill):
    E, K = 7, 3
    opts = cache.SimOptions(scope=scope, warmup_steps=warmup, together=together)
    for seed in range(3):
        trace = random_trace(seed, steps=20, L=2, E=E, K=K, prefill=prefill)
        for capacity in range(1, E + 1):
            got = cache.simulate([trace], policy, capacity, opts)
            hits, misses = brute_force(trace, policy, capacity, scope, warmup, together)
            assert got.hits.tolist() == hits, (seed, capacity)
            assert got.misses.tolist() == misses, (seed, capacity)
            assert got.tokens.tolist() == [len(step[0]) for step in trace[warmup:]]


def test_hits_plus_misses_is_k_tokens_layers():
    traces = [random_trace(s, steps=15, L=3, E=8, K=2) for s in range(2)]
    for policy, capacity in itertools.product(cache.POLICIES, range(1, 9)):
        r = cache.simulate(traces, policy, capacity)
        assert (r.hits + r.misses).sum().item() == 2 * 15 * 3 * 2  # K x tokens x layers
        assert r.misses_per_token == pytest.approx(r.misses.sum().item() / 30)


@pytest.mark.parametrize("K,capacity", [(1, 1), (2, 2), (2, 3), (3, 4), (4, 6), (4, 5)])
def test_lru_matches_brute_force(K, capacity):
    """The simulator's defaults against tests/oracles.py's plain-list LRU, sequence by sequence."""
    g = torch.Generator().manual_seed(K * 10 + capacity)
    scores = torch.randn(3, 30, 10, generator=g)
    scores[:, 1:] += 2 * scores[:, :-1]  # some temporal correlation, so hits happen
    indices = scores.topk(K, dim=-1).indices  # (B, T, K)
    traces = cache.token_traces([indices])
    want = sum(lru_hits(seq, capacity) for seq in indices.tolist()) / indices.numel()
    assert cache.simulate(traces, "lru", capacity).hit_rate == pytest.approx(want)


def test_belady_is_never_worse_than_lru_or_lfu():
    for seed, E, K in itertools.product(range(6), (6, 10), (1, 2, 3)):
        trace = random_trace(seed, steps=30, L=2, E=E, K=K, locality=0.4 + 0.1 * (seed % 4))
        for capacity in range(1, E + 1):
            for scope in ("layer", "global"):
                opts = cache.SimOptions(scope=scope)
                best = cache.simulate([trace], "belady", capacity, opts).misses.sum()
                for policy in ("lru", "lfu"):
                    assert best <= cache.simulate([trace], policy, capacity, opts).misses.sum(), (seed, capacity)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_belady_is_optimal(K):
    """Exhaustive search over every possible cache content at every step: MIN reaches the minimum."""
    for seed in range(4):
        trace = random_trace(100 + seed, steps=10, L=1, E=5, K=K, locality=0.3)
        requests = [cache.needed_experts(step[0]) for step in trace]
        for capacity in range(1, 6):
            got = cache.simulate([trace], "belady", capacity).misses.sum().item()
            assert got == optimal_misses(requests, capacity), (seed, capacity)


def test_cache_never_exceeds_capacity_and_slots_are_distinct():
    for policy, capacity in itertools.product(("lru", "lfu"), range(1, 8)):
        c = cache.ExpertCache(capacity, policy)
        for step in random_trace(7, steps=40, L=1, E=7, K=3, prefill=4):
            needed = cache.needed_experts(step[0])
            protect = cache.step_protect(needed, capacity)
            for e in needed:
                a = c.access(e, protect)
                assert a.slot == c.slot_of[e] and (a.evicted is None or a.evicted not in c.slot_of)
                assert len(c.slot_of) <= capacity
                assert sorted(c.slot_of.values()) == list(range(len(c.slot_of)))


def test_counts_by_hand():
    """The figures the simulator and the engine share. 3 tokens, top-2, 2 MoE layers: 12 requests, 4 found
    in the cache and 8 read: hit rate 4 / 12 = 0.333, 8 / 3 = 2.67 experts loaded per token. A SimResult's
    figures are those of its totals."""
    c = cache.Counts(hits=4, misses=8, tokens=3)
    assert c.hit_rate == pytest.approx(1 / 3) and c.misses_per_token == pytest.approx(8 / 3)
    assert math.isnan(cache.Counts(0, 0, 0).hit_rate) and math.isnan(cache.Counts(0, 0, 0).misses_per_token)
    r = cache.SimResult(torch.tensor([[0, 1], [2, 1]]), torch.tensor([[2, 1], [0, 1]]), torch.tensor([2, 1]))
    assert r.totals() == cache.Counts(hits=4, misses=4, tokens=3)
    assert (r.hit_rate, r.misses_per_token) == (0.5, pytest.approx(4 / 3))
    assert r.layer_hit_rates() == [0.5, 0.5]


def test_options_are_validated():
    with pytest.raises(ValueError):
        cache.SimOptions(scope="device")
    with pytest.raises(ValueError):
        cache.ExpertCache(0)
    with pytest.raises(ValueError):
        cache.ExpertCache(2, "belady")  # no future


def test_cached_before_is_the_cache_content_before_each_token():
    """cache.cached_before against tests/oracles.py's plain-list LRU: before token t the mask holds the
    experts the list holds after tokens 0..t-1 (empty at t = 0), sequence by sequence."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 25, 10, generator=g)
    scores[:, 1:] += 1.5 * scores[:, :-1]
    indices = scores.topk(3, dim=-1).indices  # (B, T, K)
    held = cache.cached_before(indices, 5, 10)
    for b, seq in enumerate(indices.tolist()):
        for t in range(len(seq)):
            cached = []
            for experts in seq[:t]:  # the oracle's rule, replayed up to token t
                keep = [e for e in cached if e not in experts]
                cached = keep[max(0, len(keep) + len(experts) - 5):] + list(experts)
            assert set(torch.nonzero(held[b, t]).flatten().tolist()) == set(cached), (b, t)
    assert lru_hits(indices[0].tolist(), 5) == sum(held[0, t, e].item() for t, ex in enumerate(indices[0].tolist()) for e in ex)
