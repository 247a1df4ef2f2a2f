"""Brute-force expert caches: the independent oracles for cache.py's simulator and everything built
on it. Each replays one layer's routing of one sequence, a list over tokens of that token's K
expert ids ([T][K]), with plain lists and loops, and returns the number of hits. The rules are
those of a decoder that needs a token's K experts together: they are looked up before any of them
is loaded, and a token never evicts one of its own experts (capacity >= K). Below them, cache-aware
routing by brute force: one token's guaranteed choice and its drift from the true routing, and a
resident decode loop that steers model.py's modules by a brute-force LRU list.
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


# ----------------------------------------------------------------------------------------------
# Cache-aware routing, brute force: one token's choice from its router scores (a list over experts)

def guaranteed_choice(scores, k, cached, keep, margin):
    """model.guaranteed_topk slot by slot: the true top-`keep` first; then each further slot takes the best
    cached expert not yet chosen scoring at least (true k-th best score - margin), else the best expert not
    yet chosen. Returned best first."""
    order = sorted(range(len(scores)), key=lambda e: -scores[e])
    floor = scores[order[k - 1]] - margin
    chosen = order[:keep]
    for _ in range(k - keep):
        left = [e for e in order if e not in chosen]
        close = [e for e in left if e in cached and scores[e] >= floor]
        chosen.append((close or left)[0])
    return sorted(chosen, key=lambda e: -scores[e])


def drift(scores, true, used, eps=1e-6):
    """model.routing_drift for one token, over plain lists: (agreement, KL(p_true || p_used)) on the union of
    the two sets, each p the set's scores over their sum, smoothed to (p + eps) / (1 + eps |union|)."""
    union = set(true) | set(used)

    def p(chosen):
        total = sum(scores[e] for e in chosen)
        return {e: ((scores[e] / total if e in chosen else 0.0) + eps) / (1 + eps * len(union)) for e in union}

    pt, pu = p(true), p(used)
    return len(set(true) & set(used)) / len(true), sum(pt[e] * math.log(pt[e] / pu[e]) for e in union)


def resident_cache_aware(net, windows, capacity, bias=0.0, keep=None, margin=0.0):
    """Cache-aware routing without the offload engine: model.py's resident modules run one token at a time
    (teacher forcing, a cold cache per window); a brute-force LRU list per MoE layer holds the cached experts
    and counts the hits. The bias rule is the Gate's bonus on the cached experts; the guaranteed rule is
    guaranteed_choice on the gate's scores (greedy routers). Returns hit rate, perplexity, top-1 (N, T), and the
    mean agreement and KL (drift) over tokens and MoE layers."""
    import torch
    import torch.nn.functional as F

    import model

    cfg = net.config
    K = cfg.num_experts_per_tok
    nll, hits, requests, top1, drifts = 0.0, 0, 0, [], []
    with torch.no_grad():
        for w in windows:
            kv, cached = model.KVCache(), {l: [] for l in cfg.moe_layers}  # least recent first
            for t in range(len(w) - 1):
                ids = w[None, t:t + 1]
                rot = net.rope(*kv.positions(1, ids.device))
                x = net.model.embed_tokens(ids)  # (1, 1, D)
                for block in net.model.layers:
                    x = x + block.self_attn(block.input_layernorm(x), rot, kv)
                    h = block.post_attention_layernorm(x)
                    if not isinstance(block.mlp, model.MoE):
                        x = x + block.mlp(h)
                        continue
                    moe, flat, held = block.mlp, h.view(1, -1), cached[block.mlp.layer]  # flat (1, D)
                    true, _, scores = moe.gate(flat)
                    s = scores[0].tolist()
                    if keep is None:
                        bonus = torch.zeros(cfg.n_routed_experts)
                        bonus[held] = bias
                        idx, weights, _ = moe.gate(flat, bonus)
                    else:
                        assert cfg.topk_method == "greedy"  # guaranteed_choice ranks the scores themselves
                        idx = torch.tensor([guaranteed_choice(s, K, set(held), keep, margin)])
                        weights = scores.gather(-1, idx)
                        if cfg.norm_topk_prob:
                            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
                        weights = weights * cfg.routed_scaling_factor
                    experts = idx[0].tolist()
                    drifts.append(drift(s, true[0].tolist(), experts))
                    hits += sum(e in held for e in experts)
                    requests += len(experts)
                    rest = [e for e in held if e not in experts]
                    cached[moe.layer] = rest[max(0, len(rest) + len(experts) - capacity):] + experts
                    x = x + (model.run_experts(flat, idx, weights, moe.experts) + moe.shared(flat)).view_as(x)
                kv.advance(1)
                logits = net.lm_head(net.model.norm(x))[0, -1]  # (V,)
                nll += F.cross_entropy(logits[None], w[None, t + 1]).item()
                top1.append(logits.argmax().item())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    agreement, kl = (sum(d[i] for d in drifts) / len(drifts) for i in (0, 1))
    return hits / requests, math.exp(nll / tokens), torch.tensor(top1).view(windows.shape[0], -1), agreement, kl
