"""Tests for router.py: every loss and metric against a plain Python loop, plus hand-worked cases;
and the LRU hit rate that testbed.py and train.py report (cache.simulate) against two LRU loops.

The brute-force references below loop over sequences and tokens with Python sets and floats, so
they share no code (and no vectorisation trick) with router.py or cache.py.
"""
import math
import random
from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch

import cache
import router


class Routing(NamedTuple):  # same fields as model.py's, defined here so the test stands alone
    layer: int
    indices: torch.Tensor  # [B,T,K]
    weights: torch.Tensor  # [B,T,K]
    scores: torch.Tensor  # [B,T,E]


def assert_close(actual, expected, tol=1e-6):
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    err = (a - e).abs()
    assert err.max() <= tol, f"max err {err.max():.3g}, mean err {err.mean():.3g}"


def random_routing(seed, B=2, T=10, E=8, K=2, score_func="softmax", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, E, generator=g, dtype=torch.float64) * 2
    logits.requires_grad_(requires_grad)
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    weights, indices = scores.topk(K, dim=-1)
    return logits, Routing(0, indices, weights, scores)


def random_layers(seed, L=3, **kw):
    return [random_routing(seed * 100 + l, **kw)[1]._replace(layer=l) for l in range(L)]


# ----------------------------------------------------------------------------
# brute-force references


def bf_recent(indices, b, t, window):
    """Set of experts chosen by tokens t-window..t-1 of sequence b."""
    return {e for s in range(max(0, t - window), t) for e in indices[b][s]}


def bf_reuse_loss(routing, window, eps):
    layer_losses = []
    for r in routing:
        idx, sc = r.indices.tolist(), r.scores.tolist()
        terms = []
        for b in range(len(idx)):
            for t in range(1, len(idx[b])):
                total = sum(sc[b][t])
                mass = sum(sc[b][t][e] / total for e in bf_recent(idx, b, t, window))
                terms.append(-math.log(mass + eps))
        layer_losses.append(sum(terms) / len(terms))
    return sum(layer_losses) / len(layer_losses)


def bf_reuse_rate(indices, window):
    idx = indices.tolist()
    shares = [sum(e in bf_recent(idx, b, t, window) for e in idx[b][t]) / len(idx[b][t])
              for b in range(len(idx)) for t in range(1, len(idx[b]))]
    return sum(shares) / len(shares)


def bf_balance(idx_tokens, sc_tokens, E):
    """sum_i f_i P_i over a list of tokens, with f_i = E/(K*N) * count_i."""
    N, K = len(idx_tokens), len(idx_tokens[0])
    total = 0.0
    for i in range(E):
        count = sum(i in token for token in idx_tokens)
        P = sum(s[i] / sum(s) for s in sc_tokens) / N
        total += E / (K * N) * count * P
    return total


def bf_switch(indices, scores, E):
    idx = [tok for seq in indices.tolist() for tok in seq]
    sc = [tok for seq in scores.tolist() for tok in seq]
    # written as the paper writes it: E * sum_i (fraction of slots) * (mean probability)
    N, K = len(idx), len(idx[0])
    frac = [sum(tok.count(i) for tok in idx) / (N * K) for i in range(E)]
    mean_p = [sum(s[i] / sum(s) for s in sc) / N for i in range(E)]
    return E * sum(f * p for f, p in zip(frac, mean_p))


def bf_sequence(indices, scores, E):
    idx, sc = indices.tolist(), scores.tolist()
    return sum(bf_balance(idx[b], sc[b], E) for b in range(len(idx))) / len(idx)


def bf_lru(seq, capacity):
    """Independent LRU replay: a cache set plus a last-use clock, evicting the smallest clock."""
    cache, last_use, clock, hits = set(), {}, 0, 0
    K = len(seq[0])
    for experts in seq:
        if capacity >= K:
            hits += len(cache & set(experts))
            for e in experts:
                if e not in cache:
                    if len(cache) == capacity:
                        candidates = [c for c in cache if c not in experts]
                        cache.remove(min(candidates, key=last_use.__getitem__))
                    cache.add(e)
            for e in experts:
                clock += 1
                last_use[e] = clock
        else:
            for e in experts:
                if e in cache:
                    hits += 1
                elif len(cache) == capacity:
                    cache.remove(min(cache, key=last_use.__getitem__))
                cache.add(e)
                clock += 1
                last_use[e] = clock
    return hits


# ----------------------------------------------------------------------------
# against brute force

SEEDS = [0, 1, 2]
WINDOWS = [1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("window", WINDOWS)
def test_recent_experts_mask(seed, window):
    _, r = random_routing(seed)
    recent, valid = router.recent_experts_mask(r.indices, 8, window)
    assert recent.shape == (2, 10, 8) and recent.dtype == torch.bool
    assert valid.shape == (2, 10)
    idx = r.indices.tolist()
    for b in range(2):
        for t in range(10):
            assert set(recent[b, t].nonzero().flatten().tolist()) == bf_recent(idx, b, t, window)
            assert bool(valid[b, t]) == (t >= 1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_reuse_loss_matches_loop(seed, window, score_func):
    layers = random_layers(seed, score_func=score_func)
    got = router.reuse_loss(layers, window=window, eps=1e-6)
    assert got.shape == ()
    assert_close(got, bf_reuse_loss(layers, window, 1e-6))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("window", WINDOWS)
def test_reuse_rate_matches_loop(seed, window):
    layers = random_layers(seed)
    overall, per_layer = router.reuse_rate_over_layers(layers, window)
    expected = [bf_reuse_rate(r.indices, window) for r in layers]
    assert_close(per_layer, expected)
    assert_close(overall, sum(expected) / len(expected))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_balance_losses_match_loop(seed, score_func):
    _, r = random_routing(seed, score_func=score_func)
    assert_close(router.switch_balance_loss(r.indices, r.scores, 8), bf_switch(r.indices, r.scores, 8))
    assert_close(router.sequence_balance_loss(r.indices, r.scores, 8),
                 bf_sequence(r.indices, r.scores, 8))
    layers = random_layers(seed, score_func=score_func)
    for kind, bf in [("switch", bf_switch), ("sequence", bf_sequence)]:
        expected = sum(bf(x.indices, x.scores, 8) for x in layers) / len(layers)
        assert_close(router.balance_loss(layers, 8, kind), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_expert_load_matches_loop(seed):
    _, r = random_routing(seed)
    load = router.expert_load(r.indices, 8)
    flat = r.indices.flatten().tolist()
    counts = [flat.count(e) for e in range(8)]
    mean = sum(counts) / 8
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / 8)
    assert load["counts"].tolist() == counts
    assert_close(load["max_over_mean"], max(counts) / mean)
    assert_close(load["cv"], std / mean)


# ----------------------------------------------------------------------------
# the worked example in layer_reuse_loss's docstring


def docstring_example():
    scores = torch.tensor([[[0.10, 0.60, 0.20, 0.10],
                            [0.25, 0.50, 0.125, 0.125],
                            [0.50, 0.25, 0.125, 0.125]]], dtype=torch.float64)  # (B=1, T=3, E=4)
    indices = scores.topk(1, dim=-1).indices  # (1, 3, 1)
    return indices, scores


def test_docstring_example():
    indices, scores = docstring_example()
    assert indices.flatten().tolist() == [1, 1, 0]
    loss = router.layer_reuse_loss(indices, scores, window=1, eps=0.0)
    assert_close(loss, 1.5 * math.log(2), tol=1e-12)
    assert abs(loss.item() - 1.0397) < 1e-4
    assert router.reuse_rate(indices, window=1) == 0.5
    # the default eps moves the value by less than 1e-5
    assert_close(router.layer_reuse_loss(indices, scores, window=1), 1.5 * math.log(2), tol=1e-5)


# ----------------------------------------------------------------------------
# gradients


def test_reuse_loss_gradients():
    logits, r = random_routing(0, requires_grad=True)
    assert r.indices.dtype == torch.long and not r.indices.requires_grad  # ints: no grad path
    loss = router.layer_reuse_loss(r.indices, r.scores)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert (logits.grad[:, 0] == 0).all()  # t=0 has no history, so it does not enter the loss
    # experts in R_t are pulled up (negative gradient), all others pushed down
    recent, _ = router.recent_experts_mask(r.indices, 8, 1)
    g = logits.grad[:, 1:]
    assert (g[recent[:, 1:]] < 0).all() and (g[~recent[:, 1:]] > 0).all()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_more_mass_on_recent_lowers_loss(score_func):
    logits, r = random_routing(1, score_func=score_func)
    recent, _ = router.recent_experts_mask(r.indices, 8, 2)
    act = torch.softmax if score_func == "softmax" else (lambda x, dim: x.sigmoid())
    before = router.layer_reuse_loss(r.indices, r.scores, window=2)
    boosted = act(logits + 1.0 * recent, dim=-1)  # raise logits of experts in R_t, same R_t
    after = router.layer_reuse_loss(r.indices, boosted, window=2)
    assert after < before
    # all mass on R_t: the loss is ~0 (only eps remains)
    only_recent = act(logits.masked_fill(~recent, -1e4), dim=-1)
    assert router.layer_reuse_loss(r.indices, only_recent, window=2) < 1e-5


def test_balance_losses_have_gradient():
    logits, r = random_routing(2, requires_grad=True)
    (router.switch_balance_loss(r.indices, r.scores, 8)
     + router.sequence_balance_loss(r.indices, r.scores, 8)).backward()
    assert logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# the Trust-KL anchor


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_router_kl_loss_matches_loop(score_func, margin):
    base = random_layers(3, score_func=score_func)
    tuned = random_layers(4, score_func=score_func)
    per_layer = []
    for b, t in zip(base, tuned):
        terms = []
        for pb, pt in zip(b.scores.reshape(-1, 8).tolist(), t.scores.reshape(-1, 8).tolist()):
            p = [x / sum(pb) for x in pb]
            q = [x / sum(pt) for x in pt]
            kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            terms.append(max(0.0, kl - margin))
        per_layer.append(sum(terms) / len(terms))
    assert_close(router.router_kl_loss(base, tuned, margin), sum(per_layer) / len(per_layer), 1e-5)


def test_router_kl_loss_is_free_inside_the_margin_and_pulls_back_beyond_it():
    """Worked by hand, E = 2: p_base = (0.5, 0.5), p_tuned = (0.8, 0.2): KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    = 0.5 ln(0.625 x 2.5) = 0.5 ln 1.5625 = 0.22314. Margin 0.3: no penalty; margin 0.1: 0.12314, and its
    gradient moves the tuned logits back toward the base distribution."""
    base = [Routing(0, torch.zeros(1, 1, 1, dtype=torch.long), None, torch.tensor([[[0.5, 0.5]]]))]
    logits = torch.log(torch.tensor([[[0.8, 0.2]]])).requires_grad_(True)
    tuned = [Routing(0, torch.zeros(1, 1, 1, dtype=torch.long), None, logits.softmax(-1))]
    assert router.router_kl_loss(base, tuned, 0.3).item() == 0.0
    loss = router.router_kl_loss(base, tuned, 0.1)
    assert loss.item() == pytest.approx(0.5 * math.log(1.5625) - 0.1, abs=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 0] > 0 > logits.grad[0, 0, 1]  # descent lowers expert 0, raises expert 1


# ----------------------------------------------------------------------------
# balance: uniform gives 1, collapse gives more


def test_balance_uniform_is_one_and_collapsed_is_larger():
    B, T, E, K = 2, 8, 8, 2
    # round-robin routing: token t picks experts 2t, 2t+1 (mod E): every expert used T*K/E times
    t = torch.arange(T)
    indices = torch.stack([(2 * t) % E, (2 * t + 1) % E], dim=-1).expand(B, T, K)  # (B, T, K)
    uniform = torch.full((B, T, E), 1.0 / E, dtype=torch.float64)
    assert_close(router.switch_balance_loss(indices, uniform, E), 1.0)
    assert_close(router.sequence_balance_loss(indices, uniform, E), 1.0)
    sigmoid_uniform = torch.full((B, T, E), 0.3, dtype=torch.float64)  # sums to 2.4, not 1
    assert_close(router.sequence_balance_loss(indices, sigmoid_uniform, E), 1.0)
    assert_close(router.switch_balance_loss(indices, sigmoid_uniform, E), 1.0)
    load = router.expert_load(indices, E)
    assert load["max_over_mean"] == 1.0 and load["cv"] == 0.0

    collapsed_idx = torch.tensor([0, 1]).expand(B, T, K)  # every token -> experts 0, 1
    collapsed_p = torch.zeros(B, T, E, dtype=torch.float64)
    collapsed_p[..., :2] = 0.5
    assert_close(router.switch_balance_loss(collapsed_idx, collapsed_p, E), E / K)
    assert_close(router.sequence_balance_loss(collapsed_idx, collapsed_p, E), E / K)
    # counts alone do not raise it: with uniform probabilities the loss is 1 whatever the load,
    # it grows only when the probabilities follow the overloaded experts
    assert_close(router.switch_balance_loss(collapsed_idx, uniform, E), 1.0)
    assert router.expert_load(collapsed_idx, E)["max_over_mean"] == E / K


# ----------------------------------------------------------------------------
# data parallel: the switch loss with its counts summed over processes


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_switch_loss_split_over_processes_equals_one_process(score_func):
    """Two processes with half of the batch each, whose expert counts `reduce` sums: the mean of their
    losses, and of their gradients (what DDP averages), is the one-process loss and gradient over the
    whole batch. Without `reduce` each half balances only itself, and the gradient differs."""
    logits, r = random_routing(4, B=4, score_func=score_func, requires_grad=True)
    full = router.switch_balance_loss(r.indices, r.scores, 8)
    (grad_full,) = torch.autograd.grad(full, logits, retain_graph=True)
    halves = [slice(0, 2), slice(2, 4)]
    counts = [torch.bincount(r.indices[h].reshape(-1), minlength=8) for h in halves]

    def two_processes(summed):
        losses = [router.switch_balance_loss(r.indices[h], r.scores[h], 8,
                                             (lambda c, other=counts[1 - i]: c + other) if summed else None)
                  for i, h in enumerate(halves)]
        mean = (losses[0] + losses[1]) / 2
        return mean, torch.autograd.grad(mean, logits, retain_graph=True)[0]

    loss, grad = two_processes(summed=True)
    assert_close(loss, full, tol=1e-12)
    assert_close(grad, grad_full, tol=1e-12)
    _, grad_alone = two_processes(summed=False)
    assert (grad_alone - grad_full).abs().max() > 1e-4
    # balance_loss hands `reduce` to the switch loss
    seen = []
    router.balance_loss([r], 8, "switch", reduce=lambda c: seen.append(c.clone()) or c)
    assert len(seen) == 1 and seen[0].sum() == 4 * 10 * 2


# ----------------------------------------------------------------------------
# LRU hit rate: cache.simulate, the project's one cache simulator, against two loops written here


def lru_hit_rate_loop(indices, capacity):
    """Hit rate of one layer's LRU cache of `capacity` experts, replaying routing [T,K] or [B,T,K]:
    the reference router.py held before cache.py existed, kept here as an oracle.

    Semantics, chosen to match a decoder that needs all K experts of a token before computing:
      - each sequence starts with an empty cache (cold start); the rate is hits / (B*T*K);
      - capacity >= K: the token's K experts are looked up in the cache as it was before the
        token; the misses are loaded, each evicting the least-recently-used expert that this
        token does not need (a token never evicts one of its own experts); then the K experts
        become the most recent, in top-k slot order (slot K-1 most recent);
      - capacity < K: the token cannot hold its experts together, so they stream through the
        cache one at a time in slot order, each a plain LRU access (hit only if still present).
    """
    seqs = indices.reshape(-1, *indices.shape[-2:]).tolist()  # [B][T][K] python ints
    hits = requests = 0
    for seq in seqs:
        lru = OrderedDict()  # keys ordered from least to most recently used
        for experts in seq:
            requests += len(experts)
            if capacity < len(experts):
                for e in experts:
                    if e in lru:
                        hits += 1
                    elif len(lru) == capacity:
                        lru.popitem(last=False)
                    lru[e] = None
                    lru.move_to_end(e)
                continue
            misses = [e for e in experts if e not in lru]
            hits += len(experts) - len(misses)
            while len(lru) + len(misses) > capacity:
                victim = next(e for e in lru if e not in experts)  # oldest not needed now
                del lru[victim]
            for e in experts:
                lru[e] = None
                lru.move_to_end(e)
    return hits / requests


def simulated_lru(indices, capacity):
    """cache.simulate's LRU hit rate for one layer's routing [T,K] or [B,T,K], as base.evaluate calls it."""
    per_layer = [indices.reshape(-1, *indices.shape[-2:])]  # one layer, (B, T, K)
    return cache.simulate(cache.token_traces(per_layer), "lru", capacity).hit_rate


@pytest.mark.parametrize("seed", range(20))
def test_lru_matches_independent_simulation(seed):
    rng = random.Random(seed)
    E, K, T = rng.choice([4, 8, 16]), rng.choice([1, 2, 3]), rng.randint(1, 40)
    seq = [rng.sample(range(E), K) for _ in range(T)]
    for capacity in range(1, E + 2):
        expected = bf_lru(seq, capacity) / (T * K)
        assert lru_hit_rate_loop(torch.tensor(seq), capacity) == expected, (seq, capacity)
        assert simulated_lru(torch.tensor(seq), capacity) == expected, (seq, capacity)


def test_lru_batch_is_independent_cold_starts():
    rng = random.Random(7)
    seqs = [[rng.sample(range(8), 2) for _ in range(12)] for _ in range(3)]
    expected = sum(bf_lru(s, 3) for s in seqs) / (3 * 12 * 2)
    assert lru_hit_rate_loop(torch.tensor(seqs), 3) == expected  # (B=3, T=12, K=2)
    assert simulated_lru(torch.tensor(seqs), 3) == expected


def test_lru_over_layers_is_the_mean_of_the_layers():
    """base.evaluate replays all MoE layers at once, each with its own cache: every layer makes the
    same number of requests, so the pooled rate is the mean of the per-layer rates."""
    layers = random_layers(5)
    for capacity in (1, 2, 3, 4, 8):
        expected = sum(lru_hit_rate_loop(r.indices, capacity) for r in layers) / len(layers)
        got = cache.simulate(cache.token_traces(layers), "lru", capacity).hit_rate
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("lru_hit_rate", [lru_hit_rate_loop, simulated_lru])
def test_lru_hand_cases(lru_hit_rate):
    # capacity >= E: only cold misses, one per distinct expert
    seq = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 0], [1, 3]])
    assert lru_hit_rate(seq, capacity=4) == (10 - 4) / 10
    # capacity == K: a repeated set hits twice, a set sharing one expert hits once
    assert lru_hit_rate(torch.tensor([[0, 1], [0, 1], [1, 2]]), capacity=2) == 3 / 6
    # a token never evicts its own expert: after [0, 5], [0, 1] the cache is 0 (older), 1 (newer);
    # token [2, 0] hits 0 and loads 2 by evicting 1, not the older 0 that it needs itself;
    # so the last token [0, 2] hits twice: 0 + 1 + 1 + 2 hits out of 8
    assert lru_hit_rate(torch.tensor([[0, 5], [0, 1], [2, 0], [0, 2]]), capacity=2) == 4 / 8
    # capacity < K streams: capacity 1, tokens [0, 1] then [1, 0]: 0 miss, 1 miss, 1 hit, 0 miss
    assert lru_hit_rate(torch.tensor([[0, 1], [1, 0]]), capacity=1) == 1 / 4


def test_routing_report():
    layers = random_layers(3)
    rep = router.routing_report(layers, 8, windows=(1, 2))
    assert rep["layers"] == [0, 1, 2]
    for w in (1, 2):
        assert_close(rep["reuse_per_layer"][w], [bf_reuse_rate(r.indices, w) for r in layers])
        assert_close(rep["reuse"][w], sum(rep["reuse_per_layer"][w]) / 3)
    assert rep["reuse"][2] >= rep["reuse"][1]
    assert len(rep["load_max_over_mean"]) == len(rep["load_cv"]) == 3
    assert "lru_hit_rate" not in rep  # cache hit rates are cache.py's


def test_reuse_loss_with_a_given_recent_set():
    """`recent` replaces R_t: with the window's own mask it is the same loss; with another set the mass
    is taken on that set (brute force)."""
    logits, r = random_routing(5)
    mask, _ = router.recent_experts_mask(r.indices, 8, 2)
    assert_close(router.layer_reuse_loss(r.indices, r.scores, 2, recent=mask), router.layer_reuse_loss(r.indices, r.scores, 2))
    g = torch.Generator().manual_seed(1)
    other = torch.rand(2, 10, 8, generator=g) < 0.4  # any set per token
    want = []
    for b in range(2):
        for t in range(1, 10):
            mass = sum(r.scores[b, t, e].item() for e in range(8) if other[b, t, e])
            want.append(-math.log(mass + 1e-6))
    assert_close(router.layer_reuse_loss(r.indices, r.scores, recent=other), sum(want) / len(want), 1e-5)
