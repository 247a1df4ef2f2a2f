"""
cache.py: expert caches for offloaded MoE decoding: which experts stay in fast memory, and how many
requests a routing trace would miss.

What it teaches: a device holding `capacity` routed experts per MoE layer reads every other expert a
token selects from storage. How often depends on the routing (what ReMoE trains), the eviction policy
(LRU, LFU, or Belady's offline optimum, the bound no policy can beat) and the rules of the simulation,
each a `SimOptions` field with a stated default. The decode engine (offload_infer.py) drives the same
`ExpertCache`, so its counts equal the simulator's; the tests check both against a brute-force replay.
Leaves out: prefetching, variable-size experts, caching below whole experts. Follows: Belady (IBM
Systems Journal, 1966) for MIN; Eliseev & Mazur (2023) for the per-layer LRU expert cache.

    python cache.py --model runs/default/base                          # LRU/LFU/Belady hit rates on a text (CPU)
    python cache.py --model runs/default/base --capacity 4 8 16 --scope global --warmup-steps 16

Shapes: T tokens, E routed experts, K top-k, L MoE layers, S steps.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoint
import cli
import model

POLICIES = ("lru", "lfu", "belady")


# ----------------------------------------------------------------------------------------------
# Policies: which cached expert leaves when a new one must come in. Each policy is an eviction key
# over the cached experts; the smallest key leaves. Every key ends with the last-use time, so ties
# always go to the least recently used expert and the choice is deterministic.

class LRU:
    """Least recently used leaves first (mixtral-offloading; the ReMoE paper's setting)."""
    name = "lru"

    def __init__(self):
        self.last = {}  # expert -> clock of its last access

    def touch(self, item, clock, use=True):
        self.last[item] = clock

    def key(self, item):
        return self.last[item]


class LFU(LRU):
    """Least frequently used leaves first. Frequencies count every request since the start of the
    sequence, including those made while the expert was not cached: an expert's popularity is a
    property of the router, not of its stay in the cache (with in-cache counts a newly loaded
    expert starts at 1 and is usually the next to go)."""
    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count = {}

    def touch(self, item, clock, use=True):
        super().touch(item, clock)
        if use:  # a prefetch moves an expert in without the router having asked for it
            self.count[item] = self.count.get(item, 0) + 1

    def key(self, item):
        return (self.count.get(item, 0), self.last[item])


class Belady(LRU):
    """MIN: the expert whose next request lies furthest in the future leaves first (never again =
    infinitely far). It reads the future, so it replays traces only; with the step rule below it
    gives the fewest misses any policy could reach (the tests check this against an exhaustive
    search on small traces)."""
    name = "belady"

    def __init__(self, future):
        super().__init__()
        self.future = list(future)  # every access this cache will see, in order
        self.next_use = {}
        upcoming, self.after = {}, [math.inf] * len(self.future)  # after[i]: next clock that repeats future[i]
        for i in range(len(self.future) - 1, -1, -1):
            self.after[i] = upcoming.get(self.future[i], math.inf)
            upcoming[self.future[i]] = i

    def touch(self, item, clock, use=True):
        assert self.future[clock] == item, "Belady was given a different future than the trace it replays"
        super().touch(item, clock)
        self.next_use[item] = self.after[clock]

    def key(self, item):
        return (-self.next_use[item], self.last[item])


def make_policy(name, future=None):
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "belady":
        if future is None:
            raise ValueError("belady needs the future accesses; it exists for traces only")
        return Belady(future)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")


class Access(NamedTuple):
    """What one lookup did."""
    expert: object         # expert id (or (layer, expert) in a global pool)
    slot: int              # where it is now
    hit: bool              # it was cached already
    evicted: object        # the expert it replaced, or None


class ExpertCache:
    """Which experts sit in which of `capacity` slots. Slots fill in order 0, 1, ... and are then
    only reused, so a slot index is also an index into preallocated weight tensors."""

    def __init__(self, capacity, policy="lru", future=None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = make_policy(policy, future) if isinstance(policy, str) else policy
        self.slot_of = {}  # expert -> slot; never more than `capacity` entries
        self.clock = 0     # accesses so far

    def access(self, expert, protect=(), use=True):
        """Look `expert` up; on a miss give it a slot, evicting the policy's choice among the cached
        experts not in `protect` (the experts the current step still needs)."""
        slot, hit, evicted = self.slot_of.get(expert), expert in self.slot_of, None
        if not hit:
            if len(self.slot_of) < self.capacity:
                slot = len(self.slot_of)
            else:
                evicted = min((e for e in self.slot_of if e not in protect), key=self.policy.key)
                slot = self.slot_of.pop(evicted)
            self.slot_of[expert] = slot
        self.policy.touch(expert, self.clock, use)
        self.clock += 1
        return Access(expert, slot, hit, evicted)

    def request(self, experts, together=True):
        """The step rule: all of `experts` are needed now. If they fit, none is evicted for another,
        so hits are those cached before the step; if not, they stream through one at a time."""
        protect = step_protect(experts, self.capacity, together)
        return [self.access(e, protect) for e in experts]


def needed_experts(tokens):
    """The distinct experts a step needs, in order of first appearance: tokens is [[K ids] per token]."""
    return list(dict.fromkeys(e for token in tokens for e in token))


def step_protect(needed, capacity, together=True):
    """The experts that may not be evicted while the step loads the others."""
    return frozenset(needed) if together and len(needed) <= capacity else frozenset()


# ----------------------------------------------------------------------------------------------
# Trace simulation. A trace is one sequence: a list of steps; a step is a list over MoE layers of
# that step's tokens, each the list of its K expert ids: trace[s][l] = [[K ids] per token].
# Python lists rather than tensors: the replay is a loop over accesses either way.

@dataclass
class SimOptions:
    """The rules of a simulation, each stated (published hit rates differ by more than ten points
    because simulators leave them unstated):
      - scope "layer": every MoE layer has `capacity` slots of its own; "global": one pool of
        capacity x L slots shared by all layers (the same memory, experts compete across layers);
      - warmup_steps 0: the cache is empty at the start of every sequence and every request counts
        (cold start); N: the first N steps of each sequence fill the cache uncounted (warm);
      - together: a step's experts are needed at the same time, so when they fit (capacity >= their
        number) none is evicted to make room for another, and hits are decided for the whole step
        before recency changes; when they do not fit they stream through one at a time. False makes
        every access an independent lookup.
    A *step* is one forward pass: one token while decoding, or a whole prompt in a batched prefill;
    it needs the distinct experts its tokens chose, in order of first appearance."""
    scope: str = "layer"
    warmup_steps: int = 0
    together: bool = True

    def __post_init__(self):
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class Counts:
    """What the caches were asked over some tokens, all MoE layers together: the figures that the
    simulator and the decode engine (offload_infer.Record) both report."""
    hits: int    # requests found in the cache
    misses: int  # requests read from storage: expert loads
    tokens: int  # the tokens that made the requests

    @property
    def hit_rate(self):
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else float("nan")

    @property
    def misses_per_token(self):
        """Experts loaded per token, all MoE layers together: what sets the bytes read per token."""
        return self.misses / self.tokens if self.tokens else float("nan")


@dataclass
class SimResult:
    """Counts of the counted steps of every sequence, one row per step."""
    hits: torch.Tensor    # (S, L) requests found in the cache, per step and MoE layer
    misses: torch.Tensor  # (S, L) requests read from storage
    tokens: torch.Tensor  # (S,) tokens in each step (1 while decoding, the prompt length for a prefill)

    def totals(self):
        return Counts(self.hits.sum().item(), self.misses.sum().item(), self.tokens.sum().item())

    @property
    def hit_rate(self):
        return self.totals().hit_rate

    @property
    def misses_per_token(self):
        return self.totals().misses_per_token

    def layer_hit_rates(self):
        return (self.hits.sum(0) / (self.hits + self.misses).sum(0).clamp_min(1)).tolist()


def token_traces(routing):
    """Traces from one full forward pass over B sequences: one step per token. `routing` is a list
    (one per MoE layer) of model.Routing or of indices tensors (B, T, K)."""
    per_layer = [(r if isinstance(r, torch.Tensor) else r.indices).tolist() for r in routing]  # [L][B][T][K]
    B, T = len(per_layer[0]), len(per_layer[0][0])
    return [[[[layer[b][t]] for layer in per_layer] for t in range(T)] for b in range(B)]


def _requests(trace, scope):
    """Per step and layer, the items a cache sees: expert ids, or (layer, expert) in a global pool."""
    return [[[(l, e) for e in needed_experts(tokens)] if scope == "global" else needed_experts(tokens)
             for l, tokens in enumerate(step)] for step in trace]


def simulate(traces, policy, capacity, options=None):
    """Replay `traces` (a list of sequences) through fresh caches and count hits and misses."""
    opt = options or SimOptions()
    hits, misses, tokens = [], [], []
    L = next((len(t[0]) for t in traces if t), 0)
    for trace in traces:
        if not trace:
            continue
        requests = _requests(trace, opt.scope)
        if opt.scope == "layer":
            futures = [[e for step in requests for e in step[l]] for l in range(L)]  # per layer, in access order
            caches = [ExpertCache(capacity, policy, futures[l] if policy == "belady" else None) for l in range(L)]
        else:
            future = [item for step in requests for layer in step for item in layer]
            shared = ExpertCache(capacity * L, policy, future if policy == "belady" else None)
            caches = [shared] * L
        for s, step in enumerate(requests):
            row_h, row_m = [], []
            for l, items in enumerate(step):
                accesses = caches[l].request(items, opt.together)
                h = sum(a.hit for a in accesses)
                row_h.append(h)
                row_m.append(len(accesses) - h)
            if s >= opt.warmup_steps:
                hits.append(row_h)
                misses.append(row_m)
                tokens.append(len(trace[s][0]))
    S = len(tokens)
    return SimResult(torch.tensor(hits, dtype=torch.long).reshape(S, L),
                     torch.tensor(misses, dtype=torch.long).reshape(S, L), torch.tensor(tokens, dtype=torch.long))


def cached_before(indices, capacity, num_experts, policy="lru"):
    """(B, T, E) bool: the experts a cache of `capacity` experts (one per sequence, cold at its start)
    holds just before each token, replaying indices (B, T, K) of one MoE layer with the step rule. ReMoE
    trained for the device's cache uses this as its recent set instead of the last w tokens' experts."""
    B, T, _ = indices.shape
    held = torch.zeros(B, T, num_experts, dtype=torch.bool)
    for b, seq in enumerate(indices.tolist()):
        c = ExpertCache(capacity, policy)
        for t, experts in enumerate(seq):
            held[b, t, list(c.slot_of)] = True
            c.request(needed_experts([experts]))
    return held.to(indices.device)


def steered_route(gate, x, capacity, rule, drift=None, prompt_len=0):
    """The gate's outputs for x (B, T, D) under cache-aware routing as the offload engine runs it: token by
    token, each sequence with its own LRU cache of `capacity` experts (cold at its start) holding what the
    steered choices before the token loaded. Exact for a whole batch: a layer's scores depend on no choice of
    that layer. The choice is not differentiable; the chosen experts' weights carry gradients as usual.
    Returns indices (B*T, K), weights (B*T, K), scores (B*T, E), the tokens in x's order. With a list `drift`,
    appends each token step's model.routing_drift (agreement, KL), each (B,), against the gate's own choice.
    With prompt_len P, the first P tokens are one step, as the engine prefills a prompt: routed against the cold
    cache, so plainly, then their experts requested together."""
    B, T, _ = x.shape
    caches, out = [ExpertCache(capacity) for _ in range(B)], []  # out: per step (B, tokens, K), (B, tokens, K), (B, tokens, E)
    if prompt_len:
        out.append([o.view(B, prompt_len, -1) for o in gate(x[:, :prompt_len].flatten(0, 1))])
        for c, tokens in zip(caches, out[0][0].tolist()):
            c.request(needed_experts(tokens))
    for t in range(prompt_len, T):
        held = torch.zeros(B, gate.cfg.n_routed_experts, dtype=torch.bool)
        for b, c in enumerate(caches):
            held[b, list(c.slot_of)] = True
        held = held.to(x.device)
        steer = {"bonus": held * rule["bias"]} if "bias" in rule else {"cached": held, **rule}
        indices, weights, scores = gate(x[:, t], **steer)  # (B, K), (B, K), (B, E)
        if drift is not None:
            drift.append(model.routing_drift(scores, gate(x[:, t])[0], indices))
        for c, experts in zip(caches, indices.tolist()):
            c.request(needed_experts([experts]))
        out.append([o.unsqueeze(1) for o in (indices, weights, scores)])
    return [torch.cat(o, 1).flatten(0, 1) for o in zip(*out)]


@contextmanager
def steered(net, capacity, rule, drift=None, prompt_len=0):
    """Within the block every MoE layer of `net` routes by steered_route (rule None: plain routing)."""
    before = [m.route for m in net.moes()]
    for m in net.moes():
        m.route = partial(steered_route, capacity=capacity, rule=rule, drift=drift, prompt_len=prompt_len) if rule else None
    try:
        yield net
    finally:
        for m, route in zip(net.moes(), before):
            m.route = route


def sweep(traces, capacities, policies=POLICIES, options=None):
    """{(policy, capacity): SimResult} for every combination: the table a hit-rate study reports."""
    return {(p, c): simulate(traces, p, c, options) for p in policies for c in capacities}


# ----------------------------------------------------------------------------------------------
# Command line: hit rates of every policy on a text's routing

def main(argv=None):
    p = cli.ArgumentParser(description="Replay a model's routing of a text through expert caches of every policy "
                                       "(read bandwidth: python store.py).")
    p.add_argument("--model", default=None, help=f"checkpoint folder (default: {cli.DEFAULT_TUNED_DIR} if it "
                                                 f"exists, else {cli.DEFAULT_BASE_DIR})")
    p.add_argument("--text", default=__file__, help="text file whose routing is replayed (default: this file)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the text to route (capped by the context)")
    p.add_argument("--capacity", type=int, nargs="+", default=[4, 8, 16], help="experts per MoE layer to simulate")
    p.add_argument("--scope", choices=("layer", "global"), default=SimOptions.scope,
                   help="capacity per MoE layer, or one pool of capacity x L shared by all layers")
    p.add_argument("--warmup-steps", type=int, default=SimOptions.warmup_steps,
                   help="tokens that fill the cache uncounted (0 = cold start)")
    p.add_argument("--independent", action="store_true", help="look a token's K experts up independently "
                                                               "(default: needed together)")
    args = p.parse_args(argv)
    path = Path(args.model or cli.default_model_dir())
    with cli.user_errors():
        if any(c < 1 for c in args.capacity):
            raise cli.UserError(f"--capacity values must be >= 1, got {args.capacity}")
        cfg = checkpoint.read_config(path)
        tok = checkpoint.load_tokenizer(path)
        if tok is None:
            raise cli.UserError(f"{path}: no tokenizer.json to encode --text")
        if not Path(args.text).is_file():
            raise cli.UserError(f"--text {args.text}: no such file")
        net = checkpoint.load_model(path)
    ids = tok.encode(Path(args.text).read_text()).ids[: min(args.tokens, cfg.max_position_embeddings)]
    with torch.no_grad():
        _, routing = net(torch.tensor([ids]), return_routing=True)
    opts = SimOptions(args.scope, args.warmup_steps, not args.independent)
    results = sweep(token_traces(routing), args.capacity, POLICIES, opts)
    print(f"{len(routing)} MoE layers, {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, "
          f"{len(routing[0].indices[0])} tokens; {opts}")
    print("capacity  " + "".join(f"{p:>10s} hit" for p in POLICIES) + "   misses/token (" + ", ".join(POLICIES) + ")")
    for c in args.capacity:
        rates = "".join(f"{results[(p, c)].hit_rate:14.3f}" for p in POLICIES)
        loads = ", ".join(f"{results[(p, c)].misses_per_token:.2f}" for p in POLICIES)
        print(f"{c:8d}  {rates}   {loads}")


if __name__ == "__main__":
    main()
