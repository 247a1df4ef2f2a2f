"""Router losses and routing metrics for ReMoE: teach a router to reuse the experts recent tokens used.

While decoding on a device that keeps only a few experts per layer in memory, every expert that
the current token selects and the cache does not hold is read from storage. If token t mostly
selects experts that tokens t-1..t-w already selected, those experts are still cached and the
read is skipped. ReMoE fine-tunes only the routers, adding a *reuse loss* that moves router
probability onto that recent set, next to the usual language-modelling loss and a load-balance
loss that stops the router from collapsing onto a handful of experts.

This file holds:
  - the recent-experts set R_t as a mask, and the reuse loss built on it;
  - two load-balance losses: Switch Transformer's (Fedus et al., 2021, eq. 4) over the whole
    batch, and DeepSeek's sequence-wise one (DeepSeek-V2 sec. 2.2.3 "expert-level balance loss";
    DeepSeek-V3 sec. 2.1.2 "complementary sequence-wise auxiliary loss");
  - metrics: reuse rate, per-expert load, and the hit rate of a brute-force per-layer LRU cache
    (cache.py generalises the cache; this one is the simple reference), gathered by
    `routing_report` for train.py and bench.py.

It leaves out padding masks and document boundaries inside packed sequences: every row of a
batch is one sequence whose history starts at t = 0.

Input: the model returns one `Routing(layer, indices, weights, scores)` per MoE layer; these
functions read only `.indices` and `.scores` (duck-typed), or take the two tensors directly.

Shape legend: B batch, T tokens, E routed experts, K top-k (experts per token), L MoE layers.
"""
from collections import OrderedDict

import torch

# ----------------------------------------------------------------------------
# router probabilities and the recent-experts set


def normalize_scores(scores):
    """Turn router scores [..., E] into a distribution over experts: p = s / sum(s).

    Softmax routers (Mixtral, Qwen, OLMoE, DeepSeek-V2) already sum to 1, so this changes
    nothing there (and leaves the gradient with respect to the router logits unchanged).
    DeepSeek-V3 scores each expert with an independent sigmoid; normalising makes "probability
    mass on a set of experts" a number in [0, 1] that means the same for both score functions,
    which is also how DeepSeek-V3 normalises scores inside its own balance loss. Because the
    division is harmless for softmax, no `score_func` switch is needed.
    """
    # sigmoid scores are > 0, so the sum only reaches 0 by underflow; the floor keeps it finite
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def recent_experts_mask(indices, num_experts, window=1):
    """R_t as a mask: which experts the previous `window` tokens of the same sequence selected.

    Returns (recent [B,T,E] bool, valid [B,T] bool). Only t = 0 has no history and is invalid;
    for 0 < t < window the history is shorter (tokens 0..t-1), which is what a decoder's cache
    holds at that point too. R_t comes from integer top-k ids, so no gradient flows through it.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, K = indices.shape
    chosen = torch.zeros(B, T, num_experts, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, indices, True)  # (B, T, E): expert e is in token t's top-k
    recent = torch.zeros_like(chosen)
    for d in range(1, min(window, T - 1) + 1):  # loop over offsets, not tokens
        recent[:, d:] |= chosen[:, :-d]  # (B, T-d, E): token t sees token t-d
    valid = (torch.arange(T, device=indices.device) >= 1).expand(B, T)  # (B, T)
    return recent, valid


# ----------------------------------------------------------------------------
# losses


def layer_reuse_loss(indices, scores, window=1, eps=1e-6):
    """Reuse loss of one MoE layer: mean over tokens t >= 1 of -log(sum_{e in R_t} p_e + eps).

    p is `normalize_scores(scores)`, R_t is `recent_experts_mask`. Why -log(mass) rather than
    -mass: it reads as the negative log-likelihood of "the token's expert comes from the recent
    set", it is 0 (up to eps) when all mass is on R_t, and its gradient, proportional to 1/mass,
    is large exactly for the tokens that ignore their history, where -mass pushes weakly.
    With softmax, d/dlogit_e = p_e (mass - [e in R_t]) / mass: experts in R_t are pulled up,
    all others down. eps only guards log(0) when a token puts no mass on R_t.

    Worked example (B=1, T=3, E=4, K=1, window=1, eps=0):

        scores  t=0: [0.10, 0.60, 0.20, 0.10]  top-1 = expert 1
                t=1: [0.25, 0.50, 0.125, 0.125] top-1 = expert 1, R_1 = {1}, mass 0.50
                t=2: [0.50, 0.25, 0.125, 0.125] top-1 = expert 0, R_2 = {1}, mass 0.25
        t=0 has no history; loss = (-log 0.5 - log 0.25) / 2 = 1.5 log 2 = 1.0397...

    (reuse_rate of the same routing: t=1 reuses its expert, t=2 does not, so 0.5.)
    """
    E = scores.shape[-1]
    recent, valid = recent_experts_mask(indices, E, window)  # (B, T, E), (B, T)
    p = normalize_scores(scores)  # (B, T, E)
    mass = (p * recent).sum(dim=-1)  # (B, T): router probability on R_t
    return -torch.log(mass[valid] + eps).mean()


def reuse_loss(routing, window=1, eps=1e-6):
    """Reuse loss of the whole model: `layer_reuse_loss` averaged over MoE layers."""
    losses = [layer_reuse_loss(r.indices, r.scores, window, eps) for r in routing]
    return torch.stack(losses).mean()


def _balance(indices, p, num_experts):
    """sum_e f_e * P_e over N tokens: indices [N,K], p [N,E]; f_e = E/(K*N) * count_e, P_e = mean p.

    f_e is the share of the N*K token-slots sent to e, scaled by E so that uniform routing gives
    f_e = 1 and P_e = 1/E, hence a loss of exactly 1. It only grows when the experts that get
    many tokens also get high probability; f carries no gradient (counts of integer ids), so the
    loss trains the router to lower the probability of the overloaded experts.
    """
    N, K = indices.shape
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(p.dtype)  # (E,)
    f = counts * num_experts / (K * N)  # (E,)
    return (f * p.mean(dim=0)).sum()


def switch_balance_loss(indices, scores, num_experts):
    """Switch Transformer balance loss over all tokens of the batch: E * sum_e f_e P_e.

    f_e = fraction of token-slots routed to e (counted over B*T*K, so f sums to 1), P_e = mean
    router probability of e. Equals 1.0 for perfectly uniform routing, E/K when every token
    sends all its probability and its K slots to the same K experts.
    """
    E = num_experts
    return _balance(indices.reshape(-1, indices.shape[-1]),  # (B*T, K)
                    normalize_scores(scores).reshape(-1, E),  # (B*T, E)
                    E)


def sequence_balance_loss(indices, scores, num_experts):
    """DeepSeek's sequence-wise balance loss, mean over the B sequences of sum_i f_i P_i.

    Per sequence: f_i = E/(K*T) * (number of tokens selecting i), P_i = mean over t of
    s_{i,t} / sum_j s_{j,t}. This is the Switch loss computed per sequence instead of over the
    batch, so one sequence cannot hide its imbalance behind another's. 1.0 for uniform routing.
    DeepSeek multiplies it by a small alpha; that weight belongs to the training loop.
    """
    p = normalize_scores(scores)  # (B, T, E)
    per_seq = [_balance(indices[b], p[b], num_experts) for b in range(indices.shape[0])]
    return torch.stack(per_seq).mean()


def balance_loss(routing, num_experts, kind="sequence"):
    """A balance loss averaged over MoE layers; kind is "sequence" (DeepSeek) or "switch"."""
    fns = {"sequence": sequence_balance_loss, "switch": switch_balance_loss}
    if kind not in fns:
        raise ValueError(f"kind must be one of {sorted(fns)}, got {kind!r}")
    return torch.stack([fns[kind](r.indices, r.scores, num_experts) for r in routing]).mean()


# ----------------------------------------------------------------------------
# metrics (no gradient; python floats)


def reuse_rate(indices, window=1):
    """Share of a token's top-k experts that R_t already holds, mean over tokens t >= 1 of one layer.

    This is the hit rate of an idealised cache that keeps exactly the last `window` tokens'
    experts. Returns nan when T < 2 (no token has a history).
    """
    B, T, K = indices.shape
    hit = torch.zeros(B, T, K, dtype=torch.bool, device=indices.device)
    for d in range(1, min(window, T - 1) + 1):
        # (B, T-d, K, 1) == (B, T-d, 1, K): does slot k of token t match any slot of token t-d?
        same = indices[:, d:, :, None] == indices[:, :-d, None, :]  # (B, T-d, K, K)
        hit[:, d:] |= same.any(dim=-1)  # (B, T-d, K)
    return hit[:, 1:].float().mean().item() if T > 1 else float("nan")


def reuse_rate_over_layers(routing, window=1):
    """(mean over layers, [per-layer reuse rate]) for a list of routing tuples."""
    per_layer = [reuse_rate(r.indices, window) for r in routing]
    return sum(per_layer) / len(per_layer), per_layer


def expert_load(indices, num_experts):
    """Tokens routed to each expert in one layer, and two imbalance summaries.

    Returns {"counts": LongTensor [E], "max_over_mean": float, "cv": float}; cv is the
    coefficient of variation std/mean with the population std. Balanced: 1.0 and 0.0.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)  # (E,)
    c = counts.double()
    mean = c.mean()
    return {"counts": counts,
            "max_over_mean": (c.max() / mean).item(),
            "cv": (c.std(unbiased=False) / mean).item()}


def lru_hit_rate(indices, capacity):
    """Hit rate of one layer's LRU cache of `capacity` experts, replaying routing [T,K] or [B,T,K].

    Semantics, chosen to match a decoder that needs all K experts of a token before computing:
      - each sequence starts with an empty cache (cold start); the rate is hits / (B*T*K);
      - capacity >= K: the token's K experts are looked up in the cache as it was before the
        token; the misses are loaded, each evicting the least-recently-used expert that this
        token does not need (a token never evicts one of its own experts); then the K experts
        become the most recent, in top-k slot order (slot K-1 most recent);
      - capacity < K: the token cannot hold its experts together, so they stream through the
        cache one at a time in slot order, each a plain LRU access (hit only if still present).
    Brute force on purpose: a loop over tokens is the readable reference for cache.py.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    seqs = indices.reshape(-1, *indices.shape[-2:]).tolist()  # [B][T][K] python ints
    hits = requests = 0
    for seq in seqs:
        cache = OrderedDict()  # keys ordered from least to most recently used
        for experts in seq:
            requests += len(experts)
            if capacity < len(experts):
                for e in experts:
                    if e in cache:
                        hits += 1
                    elif len(cache) == capacity:
                        cache.popitem(last=False)
                    cache[e] = None
                    cache.move_to_end(e)
                continue
            misses = [e for e in experts if e not in cache]
            hits += len(experts) - len(misses)
            while len(cache) + len(misses) > capacity:
                victim = next(e for e in cache if e not in experts)  # oldest not needed now
                del cache[victim]
            for e in experts:
                cache[e] = None
                cache.move_to_end(e)
    return hits / requests


def routing_report(routing, num_experts, windows=(1,), cache_sizes=()):
    """All routing metrics of one forward pass in a dict of floats, for train.py and bench.py.

    Keys: "layers" (decoder-layer ids), "reuse" {window: mean over layers}, "reuse_per_layer"
    {window: [per layer]}, "load_max_over_mean" and "load_cv" ([per layer]), "lru_hit_rate"
    {capacity: mean over layers of a per-layer cache of that many experts}.
    """
    report = {"layers": [r.layer for r in routing], "reuse": {}, "reuse_per_layer": {}}
    for w in windows:
        report["reuse"][w], report["reuse_per_layer"][w] = reuse_rate_over_layers(routing, w)
    loads = [expert_load(r.indices, num_experts) for r in routing]
    report["load_max_over_mean"] = [x["max_over_mean"] for x in loads]
    report["load_cv"] = [x["cv"] for x in loads]
    report["lru_hit_rate"] = {
        c: sum(lru_hit_rate(r.indices, c) for r in routing) / len(routing) for c in cache_sizes}
    return report
