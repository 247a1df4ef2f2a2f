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
import offload_infer as oi
import store
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
    """bench's decode section on a tiny checkpoint (as both models): every (contender, cache) row has this
    machine's prediction and its ratio to the measurement; the prediction is latency.predict, with the figures
    measured in the row's own run, on the LRU replay of the contender's routing (cache-aware routing simulated
    token by token); the trace's loads per token are the engine's, for cache-aware routing too."""
    _, path = tiny(MAIN)
    s = bench.Settings(prompt_tokens=4, decode_windows=2, decode_tokens=6, threads=1)
    windows = random_ids(checkpoint.read_config(path).vocab_size, 3, 10, seed=5)  # a warm-up window, then 2
    dec = bench.decode_section(s, {"base": path, "tuned": path}, windows, [4, 2], torch.device("cpu"), "float32",
                               lambda *a: None, lambda: None)
    lat = dec["latency"]
    net = checkpoint.load_model(path)
    with torch.no_grad():
        sims = latency.simulate_decode(latency.routing(net, windows[1:]), 4, [4, 2])
    assert [p["name"] for p in lat["profiles"]] == ["this machine"] + [d.name for d in latency.PROFILES]
    for row, pred in zip(dec["rows"], lat["profiles"][0]["rows"]):
        m = row["machine"]
        cfg = checkpoint.read_config(path)  # a read after each MoE layer of each decode token, sizes in turn
        assert len(m["read_ms"]) == cfg.num_experts_per_tok and all(x > 0 for x in m["read_ms"])
        assert sum(m["reads_timed"]) == 2 * 6 * len(cfg.moe_layers) and max(m["reads_timed"]) - min(m["reads_timed"]) <= 1
        slowdown = (m["reading_ms_per_token"] - m["resident_ms_per_token"]) / m["reads_per_token"]
        assert m["slowdown_ms_per_read"] == pytest.approx(slowdown)
        here, steered = (latency.this_machine(m[key] / 1e3, [x / 1e3 for x in m["read_ms"]], slowdown / 1e3)
                         for key in ("resident_ms_per_token", "resident_steered_ms_per_token"))
        assert not any(bench.RESIDENT in name for name in row["contenders"])
        for name, c in row["contenders"].items():
            assert c["predicted_over_measured"] == pytest.approx(c["predicted_ms_per_token"] / c["ms_per_token"])
            assert c["predicted_ms_per_token"] == pred["ms_per_token"][name]
        for name in ("base", "tuned"):
            want = 1e3 * latency.predict(here, sims[row["capacity"]], dec["expert_bytes"])
            assert row["contenders"][name]["predicted_ms_per_token"] == pytest.approx(want)
        with torch.no_grad():  # cache-aware routing: its own trace, and the resident time with the steer on
            trace = latency.routing(net, windows[1:], row["capacity"], {"bias": 0.05}, 4)
        want = 1e3 * latency.predict(steered, latency.simulate_decode(trace, 4, [row["capacity"]])[row["capacity"]],
                                     dec["expert_bytes"])
        assert row["contenders"]["base + cache-aware 0.05"]["predicted_ms_per_token"] == pytest.approx(want)
    for i, row in enumerate(dec["rows"]):  # the batched pass routes as the engine does, token by token
        for name, c in row["contenders"].items():
            assert lat["trace_loads_per_token"][name][i] == pytest.approx(c["loads_per_token"]), (name, row["capacity"])
    md = "\n".join(bench.md_decode({"decode": dec}))
    assert "predicted / measured" in md and all(d.source in md for d in latency.PROFILES)


def test_measured_read_times():
    """A measured device reads a layer's n misses in read_s[n - 1]: resident 1 s + per token (one lone miss,
    0.2 s, and one group of three, 0.4 s) + 4 misses x 0.01 s of slowdown; past the table, the per-read share
    of its last entry."""
    d = latency.Device("d", None, None, "hand", resident_s_per_token=1.0, read_s=(0.2, 0.3, 0.4),
                       slowdown_s_per_read=0.01)
    misses = torch.tensor([[1, 3], [3, 1]])
    sim = cache.SimResult(torch.zeros_like(misses), misses, torch.tensor([1, 1]))
    assert latency.predict(d, sim, 10) == pytest.approx(1.0 + 0.6 + 0.04)
    assert latency.read_seconds(d, 6, 10) == pytest.approx(0.8)
    assert latency.seconds_per_token(d, 2, 10) == pytest.approx(1.0 + 2 * 0.21)  # only loads known: every miss alone


def test_read_probe_times_the_engines_loader(tiny):
    """ReadProbe wraps an all-resident engine: after each MoE layer of each decode token one timed read of 1 to
    top-k distinct experts through the engine's loader (the store counts their bytes), into slots of its own, so
    the logits are the unprobed engine's; its replay time is the engine's less those reads."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    engines = []
    for _ in range(2):
        engines.append(oi.OffloadEngine(path, oi.OffloadConfig(cache=cfg.n_routed_experts, io="direct")))
        engines[-1].preload_all()
    probe = latency.ReadProbe(engines[1], cfg.num_experts_per_tok)
    try:
        window = random_ids(cfg.vocab_size, 1, 12, seed=3)[0]
        _, _, want = engines[0].replay(window, 4)
        before = engines[1].store.bytes_read
        seconds, totals, logits = probe.replay(window, 4)
        torch.testing.assert_close(logits, want, rtol=0, atol=0)  # same code, same inputs: bit for bit
        reads, tokens = probe.per_window[-1]
        assert sum(map(len, reads)) == tokens * len(cfg.moe_layers) and tokens == 8 and totals.misses_per_token == 0
        assert probe.reads_per_token() == pytest.approx(sum(n * len(r) for n, r in enumerate(reads, 1)) / 8)
        assert 0 < seconds and all(s > 0 for r in reads for s in r)
        n_read = sum((n + 1) * len(r) for n, r in enumerate(reads))
        read, pad = engines[1].store.bytes_read - before, len(engines[1].store.shapes) * 2 * store.DIRECT_ALIGN
        assert n_read * engines[1].store.expert_bytes <= read <= n_read * (engines[1].store.expert_bytes + pad)
        assert probe.slots.gate.abs().sum() > 0
    finally:
        probe.close()
        engines[0].close()
