"""latency.py: the formula against hand computations, misses per token of a decode trace against a
brute-force LRU list, every named profile's figures in its source, and bench's decode section carrying
a prediction beside every measured (model, cache) row."""
import random
import re

import pytest
import torch

import bench
import cache
import checkpoint
import latency
from tiny import random_ids

MAIN = "ds2-mla-greedy"


def test_formula_by_hand():
    """resident 0.5 s + 3 misses x (10 B / 100 B/s read + 10 B / 50 B/s copy) = 1.4 s; with reads in flight at
    200 B/s, a lone miss costs 0.3 s and each of several 0.25 s; a named profile's resident time is active
    bytes / memory bandwidth."""
    d = latency.Device("d", read_bandwidth=100, host_to_device=50, source="hand", resident_s_per_token=0.5)
    assert latency.seconds_per_token(d, 3, 10) == pytest.approx(1.4)
    misses = torch.tensor([[1, 3], [0, 2]])  # two one-token steps, two layers: one lone miss, five in groups
    sim = cache.SimResult(torch.zeros_like(misses), misses, torch.tensor([1, 1]))
    assert latency.predict(d, sim, 10) == pytest.approx(0.5 + (0.3 + 5 * 0.3) / 2)  # no in-flight figure: all alone
    fast = latency.Device("d", 100, 50, "hand", resident_s_per_token=0.5, in_flight_bandwidth=200)
    assert latency.predict(fast, sim, 10) == pytest.approx(0.5 + (0.3 + 5 * 0.25) / 2)
    host = latency.Device("h", 100, None, "hand", memory_bandwidth=1000)
    assert latency.seconds_per_token(host, 2, 10, active_bytes=400) == pytest.approx(0.4 + 2 * 0.1)


def brute_decode_misses(indices, prompt_len, capacity):
    """Misses of the one-token steps after each window's prompt, with an LRU list (least recent first): the
    prompt's distinct experts enter uncounted in order of first appearance, the last `capacity` of them stay;
    a token's experts are looked up before any is loaded, and it never evicts one of its own."""
    misses = 0
    for layer in indices:
        for seq in layer.tolist():
            cached = list(dict.fromkeys(e for token in seq[:prompt_len] for e in token))[-capacity:]
            for experts in seq[prompt_len:]:
                misses += sum(e not in cached for e in experts)
                cached = ([e for e in cached if e not in experts] + experts)[-capacity:]
    return misses


def test_decode_misses_against_brute_force():
    """The trace the latency model replays: per window the prompt as one uncounted step, then one token per step."""
    rng = random.Random(0)
    L, N, T, K, E, P = 2, 3, 14, 3, 10, 4
    indices = [torch.tensor([[rng.sample(range(E), K) for _ in range(T)] for _ in range(N)]) for _ in range(L)]
    sims = latency.simulate_decode(indices, P, [3, 5, 10])
    for c, sim in sims.items():
        assert sim.tokens.sum().item() == N * (T - P)
        assert sim.misses.sum().item() == brute_decode_misses(indices, P, c), c
    assert sims[3].misses_per_token > sims[5].misses_per_token > sims[10].misses_per_token


def test_every_profile_figure_has_a_source():
    """No figure without a source: each named profile's bandwidths appear, in GB/s, in its source."""
    assert latency.PROFILES
    for d in latency.PROFILES:
        figures = [d.read_bandwidth, d.memory_bandwidth] + [d.host_to_device] * (d.host_to_device is not None)
        assert d.resident_s_per_token is None and d.memory_bandwidth, d.name  # resident time scaled to the model
        for v in figures:
            assert re.search(rf"\b{v / 1e9:g} GB/s", d.source), (d.name, v)


def test_decode_section_carries_predictions(tiny, tmp_path):
    """bench's decode section on a tiny checkpoint (as both models): every plain (model, cache) row has this
    machine's prediction and its ratio to the measurement; the prediction is latency.predict on the LRU replay
    of the model's own routing; the trace's loads per token are the engine's."""
    _, path = tiny(MAIN)
    s = bench.Settings(prompt_tokens=4, decode_windows=2, decode_tokens=6, threads=1)
    windows = random_ids(checkpoint.read_config(path).vocab_size, 3, 10, seed=5)  # a warm-up window, then 2
    dec = bench.decode_section(s, {"base": path, "tuned": path}, windows, [4, 2], torch.device("cpu"), "float32",
                               lambda *a: None, lambda: None)
    lat = dec["latency"]
    here = latency.this_machine(dec["bound"])
    sims = latency.simulate_decode(latency.routing(path, windows[1:]), 4, [4, 2])
    assert [p["name"] for p in lat["profiles"]] == ["this machine"] + [d.name for d in latency.PROFILES]
    for row, pred in zip(dec["rows"], lat["profiles"][0]["rows"]):
        for name in ("base", "tuned"):
            c = row["contenders"][name]
            want = 1e3 * latency.predict(here, sims[row["capacity"]], dec["expert_bytes"])
            assert c["predicted_ms_per_token"] == pytest.approx(want) == pred["ms_per_token"][name]
            assert c["predicted_over_measured"] == pytest.approx(want / c["ms_per_token"])
        assert "predicted_ms_per_token" not in row["contenders"]["base + cache-aware 0.05"]
    for i, row in enumerate(dec["rows"]):  # the batched pass routes as the engine does, token by token
        assert lat["trace_loads_per_token"]["base"][i] == pytest.approx(row["contenders"]["base"]["loads_per_token"])
    md = "\n".join(bench.md_decode({"decode": dec}))
    assert "predicted / measured" in md and all(d.source in md for d in latency.PROFILES)
