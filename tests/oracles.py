"""Brute-force expert caches: the independent oracles for cache.py's simulator and everything built
on it. Each replays one layer's routing of one sequence, a list over tokens of that token's K
expert ids ([T][K]), with plain lists and loops, and returns the number of hits. The rules are
those of a decoder that needs a token's K experts together: they are looked up before any of them
is loaded, and a token never evicts one of its own experts (capacity >= K).
"""
import math


def lru_hits(seq, capacity):
    """Least recent first in a plain list; a token's experts are looked up before any is loaded."""
    cached, hits = [], 0
    for experts in seq:
        hits += sum(e in cached for e in experts)
        keep = [e for e in cached if e not in experts]  # a token never evicts its own experts
        cached = keep[max(0, len(keep) + len(experts) - capacity):] + list(experts)
    return hits


def lfu_hits(seq, capacity):
    """Fewest requests since the window began leaves first; ties: the least recently used."""
    cached, count, last, clock, hits = set(), {}, {}, 0, 0
    for experts in seq:
        hits += sum(e in cached for e in experts)
        for e in experts:
            if e not in cached:
                if len(cached) == capacity:
                    cached.remove(min((x for x in cached if x not in experts), key=lambda x: (count[x], last[x])))
                cached.add(e)
            count[e], last[e], clock = count.get(e, 0) + 1, clock, clock + 1
    return hits


def belady_hits(seq, capacity):
    """Evict the cached expert (not needed now) whose next request is furthest away."""
    cached, hits = set(), 0
    for t, experts in enumerate(seq):
        hits += sum(e in cached for e in experts)
        for e in experts:
            if e not in cached:
                if len(cached) == capacity:
                    def next_use(x):
                        return next((s for s in range(t + 1, len(seq)) if x in seq[s]), math.inf)
                    cached.remove(max((x for x in cached if x not in experts), key=next_use))
                cached.add(e)
    return hits


BRUTE = {"lru": lru_hits, "lfu": lfu_hits, "belady": belady_hits}
