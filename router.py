"""router.py: the losses and metrics of ReMoE, which teaches a router to reuse the experts recent tokens used.

A device that keeps a few experts per layer in memory reads every other expert a token selects from
storage; if token t mostly selects experts that tokens t-1..t-w already selected, the read is skipped.
ReMoE fine-tunes only the routers with a *reuse loss* that moves router probability onto that recent
set R_t, beside the language-modelling loss, a load-balance loss that stops the router from collapsing
onto a few experts (Switch Transformer's over the batch, Fedus et al. 2021 eq. 4; DeepSeek's per
sequence, DeepSeek-V2 sec. 2.2.3), and the Trust-KL anchor to the original routers. The metrics: reuse
rate and expert load (cache hit rates are cache.py's). Functions read a model's `Routing` tuples
(`.indices`, `.scores`) duck-typed, so this file imports nothing of the project; distributed sums come
in as a `reduce` argument. Leaves out padding and document boundaries inside packed sequences.

Shapes: B batch, T tokens, E routed experts, K top-k (experts per token), L MoE layers.
"""
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


def layer_reuse_loss(indices, scores, window=1, eps=1e-6, recent=None):
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

    `recent` (B, T, E) bool, optional, replaces R_t: e.g. what the device's expert cache holds before
    each token (cache.cached_before), instead of the last w tokens' experts.
    """
    E = scores.shape[-1]
    recent = recent_experts_mask(indices, E, window)[0] if recent is None else recent  # (B, T, E)
    p = normalize_scores(scores)  # (B, T, E)
    mass = (p * recent).sum(dim=-1)  # (B, T): router probability on R_t
    return -torch.log(mass[:, 1:] + eps).mean()  # t = 0 has no history (a slice, not a mask: no host sync)


def reuse_loss(routing, window=1, eps=1e-6, recent=None):
    """Reuse loss of the whole model: `layer_reuse_loss` averaged over MoE layers (`recent`: one
    R_t mask per layer, or None for the last `window` tokens' experts)."""
    recent = recent or [None] * len(routing)
    losses = [layer_reuse_loss(r.indices, r.scores, window, eps, m) for r, m in zip(routing, recent)]
    return torch.stack(losses).mean()


def expert_counts(indices, num_experts):
    """(E,) how many of the token-slots in `indices` chose each expert. A scatter rather than
    torch.bincount, which on CUDA reads its input's maximum back to the host (a sync every step)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def _balance(indices, p, num_experts, reduce=None):
    """sum_e f_e * P_e over N tokens: indices [N,K], p [N,E]; f_e = E/(K*N) * count_e, P_e = mean p.

    f_e is the share of the N*K token-slots sent to e, scaled by E so that uniform routing gives
    f_e = 1 and P_e = 1/E, hence a loss of exactly 1. It only grows when the experts that get
    many tokens also get high probability; f carries no gradient (counts of integer ids), so the
    loss trains the router to lower the probability of the overloaded experts.

    reduce: None, or a function that sums the counts [E] over processes (in place or not). Then f is
    the whole batch's and P the local mean, so the mean over equal shares of each process's loss
    (and of its gradient, which is what DDP averages) is the one-process loss over the whole batch.
    """
    counts = expert_counts(indices, num_experts)  # (E,)
    if reduce is not None:
        counts = reduce(counts)
    f = counts.to(p.dtype) * num_experts / counts.sum()  # (E,); counts.sum() = K * N over the whole batch
    return (f * p.mean(dim=0)).sum()


def switch_balance_loss(indices, scores, num_experts, reduce=None):
    """Switch Transformer balance loss over all tokens of the batch: E * sum_e f_e P_e.

    f_e = fraction of token-slots routed to e (counted over B*T*K, so f sums to 1), P_e = mean
    router probability of e. Equals 1.0 for perfectly uniform routing, E/K when every token
    sends all its probability and its K slots to the same K experts. `reduce` as in `_balance`.
    """
    E = num_experts
    return _balance(indices.reshape(-1, indices.shape[-1]),  # (B*T, K)
                    normalize_scores(scores).reshape(-1, E),  # (B*T, E)
                    E, reduce)


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


def balance_loss(routing, num_experts, kind="sequence", reduce=None):
    """A balance loss averaged over MoE layers; kind is "sequence" (DeepSeek) or "switch".
    `reduce` sums the switch loss's counts over processes; the sequence loss needs none."""
    if kind == "switch":
        losses = [switch_balance_loss(r.indices, r.scores, num_experts, reduce) for r in routing]
    elif kind == "sequence":
        losses = [sequence_balance_loss(r.indices, r.scores, num_experts) for r in routing]
    else:
        raise ValueError(f"kind must be 'sequence' or 'switch', got {kind!r}")
    return torch.stack(losses).mean()


def router_kl_loss(base_routing, routing, margin=0.0):
    """Trust-KL anchor: how far the tuned routers' distributions moved from the original ones, beyond
    a free margin: mean over tokens and MoE layers of max(0, KL(p_base || p_tuned) - margin).

    p = `normalize_scores` of each routing's scores [B,T,E]; base_routing comes from the same tokens
    with the original routers and carries no gradient. Inside the margin the router may move freely
    (that is where reuse comes from); beyond it the penalty grows with the KL.
    """
    losses = []
    for b, r in zip(base_routing, routing):
        p = normalize_scores(b.scores.detach().float())  # (B, T, E)
        log_q = torch.log(normalize_scores(r.scores.float()).clamp_min(torch.finfo(torch.float32).tiny))
        kl = (p * (torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)) - log_q)).sum(-1)  # (B, T)
        losses.append((kl - margin).clamp_min(0).mean())
    return torch.stack(losses).mean()


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
    counts = expert_counts(indices, num_experts)  # (E,)
    c = counts.double()
    mean = c.mean()
    return {"counts": counts,
            "max_over_mean": (c.max() / mean).item(),
            "cv": (c.std(unbiased=False) / mean).item()}


def routing_report(routing, num_experts, windows=(1,)):
    """All routing metrics of one forward pass in a dict of floats, for testbed.py, train.py and bench.py.

    Keys: "layers" (decoder-layer ids), "reuse" {window: mean over layers}, "reuse_per_layer"
    {window: [per layer]}, "load_max_over_mean" and "load_cv" ([per layer]).
    """
    report = {"layers": [r.layer for r in routing], "reuse": {}, "reuse_per_layer": {}}
    for w in windows:
        report["reuse"][w], report["reuse_per_layer"][w] = reuse_rate_over_layers(routing, w)
    loads = [expert_load(r.indices, num_experts) for r in routing]
    report["load_max_over_mean"] = [x["max_over_mean"] for x in loads]
    report["load_cv"] = [x["cv"] for x in loads]
    return report
