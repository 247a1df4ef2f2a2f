"""
offload_infer.py: decode a MoE model whose routed experts stay on disk, holding only `--cache`
experts per MoE layer in preallocated slots.

What it teaches: offloading is a different *experts provider* inside each MoE layer, not a
different model. model.py's MoE layer asks its provider for the experts its router chose
and for their output; the resident provider has them all, this file's `OffloadedExperts` has
`capacity` slots and, per forward pass: looks the chosen experts up in its cache (cache.py's
ExpertCache), loads the misses from the safetensors files into the slots of evicted experts
(cache.py's ExpertStore), computes with the slot weights (a decode token's K small experts in one
batched matmul, else model.run_experts' loop), and records hits, misses and routing in one
`Record`. So the decode step reads, layer by layer: route, look up the cache, load the misses,
compute, record; the decoder loop itself exists once, in model.py. Everything
except the routed experts (embeddings, attention, norms, routers, shared experts, dense layers,
head) is loaded once and stays resident, and the expert memory is fixed before the first token.
A prompt is one batched step: each expert any prompt token chose is loaded once per layer
(streaming through the slots when they do not all fit) and runs on all of its tokens.

On CUDA the slots live on the GPU; a miss is read into a pinned host buffer and copied on a
dedicated stream, with one event per slot saying "loaded" (compute waits for it) and one saying
"no longer read" (the next load into that slot waits for it), so compute waits only for the
experts it needs. `--prefetch` also loads the next MoE layer's likely experts (its gate applied to
the current hidden state) while this layer computes. On the CPU the same code runs without
streams, in float32.

Optional cache-aware routing (`--cache-bias B`, off by default) adds B to the router scores of
cached experts before the top-k: fewer misses without training, at some cost in quality; ReMoE
instead teaches the router itself to prefer recently used experts.

`--compile` (with `--cache` = every expert, nothing offloaded) compiles the decode step with
torch.compile: the expert -> slot lookup becomes a tensor, the KV cache a fixed-size
model.StaticKVCache, and the whole one-token forward pass one graph of fused kernels, which removes
most of the per-operation dispatch that dominates small models on a CPU. Offloaded layers cannot be
compiled this way: their misses must be read from disk between the router and the experts.

`--bench` measures what matters on the same tokens for every contender: held-out test windows,
each a prompt (prefilled) and its true continuation fed token by token (teacher forcing), so the
base and the tuned model, with and without cache-aware routing, do identical work apart from their
routing; and it sets the engine's time against the physical bound (resident compute + bytes
missed / disk bandwidth).

Follows: Eliseev & Mazur 2023 (mixtral-offloading: per-layer LRU expert cache, pinned buffers and
a copy stream) and llama.cpp (mmap'd weights). Leaves out: batching several sequences, speculative
expert loading beyond one layer ahead, quantized compute, and multi-GPU.

    python offload_infer.py --prompt "def main():" --max-new-tokens 40               # CPU or GPU, cache 8
    python offload_infer.py --cache 4 --policy lfu --io direct --json runs/decode.json
    python offload_infer.py --cache 32 --compile                                      # all resident, compiled
    python offload_infer.py --bench                      # same-token decode of base vs ReMoE, and the I/O bound

Shapes: T tokens in the step, D hidden, E routed experts, K top-k, F expert width, C slots per layer.
"""

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import model
from cache import ExpertCache, ExpertStore, needed_experts, read_bandwidth, step_protect
from cli import UserError


@dataclass
class OffloadConfig:
    cache: int = 8             # experts per MoE layer held in slots
    policy: str = "lru"        # eviction policy: "lru" or "lfu" (Belady needs the future: traces only)
    io: str = "mmap"           # "mmap" or "direct" (O_DIRECT)
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None   # None: float32 on CPU; on CUDA the checkpoint's own dtype (bf16 for FP8)
    cache_bias: float = 0.0    # bonus added to cached experts' router scores before top-k (0: plain routing)
    prefetch: bool = False     # load the next MoE layer's predicted experts while this layer computes
    compile: bool = False      # every expert resident (cache = E): compile the decode step with torch.compile


def check_cache_size(cfg, capacity):
    if not cfg.moe_layers or cfg.n_routed_experts == 0:
        raise UserError(f"{cfg.model_type} config has no MoE layers: nothing to offload")
    if not 1 <= capacity <= cfg.n_routed_experts:
        raise UserError(f"--cache must be between 1 and the number of routed experts "
                        f"({cfg.n_routed_experts}), got {capacity}")


def check_prompt(cfg, n_prompt, max_new_tokens):
    ctx = cfg.max_position_embeddings
    if n_prompt == 0:
        raise UserError("the prompt is empty")
    if n_prompt > ctx:
        raise UserError(f"the prompt is {n_prompt} tokens, longer than the model's context of {ctx} "
                        f"(max_position_embeddings)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if n_prompt + max_new_tokens > ctx:
        raise UserError(f"the prompt ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's context of {ctx} (max_position_embeddings)")


# ----------------------------------------------------------------------------------------------
# The record: what every forward pass through the engine asked of the caches

@dataclass
class Step:
    """One forward pass: a prefill (tokens > 1) or one decode token."""
    tokens: int
    routing: list = field(default_factory=list)  # per MoE layer: [[K ids] per token] (cache.simulate's format)
    hits: list = field(default_factory=list)     # per MoE layer: requested experts found in the cache
    misses: list = field(default_factory=list)   # per MoE layer: experts read from disk for the request
    bytes_read: int = 0                          # from the files, prefetches included
    prefetched: int = 0                          # experts --prefetch loaded ahead (not requests)


@dataclass
class Totals:
    steps: int
    tokens: int
    hits: int
    misses: int
    bytes_read: int
    prefetched: int

    @property
    def hit_rate(self):
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else float("nan")

    @property
    def loads_per_token(self):
        """Experts read per token, all MoE layers together (prefetches not included)."""
        return self.misses / self.tokens if self.tokens else float("nan")

    @property
    def mb_per_token(self):
        return self.bytes_read / 1e6 / self.tokens if self.tokens else float("nan")


class Record:
    """Every step's counts, in order. Callers read them through `totals` and `trace`."""

    def __init__(self):
        self.steps = []

    def totals(self, start=0, stop=None):
        steps = self.steps[start:stop]
        return Totals(len(steps), sum(s.tokens for s in steps), sum(sum(s.hits) for s in steps),
                      sum(sum(s.misses) for s in steps), sum(s.bytes_read for s in steps),
                      sum(s.prefetched for s in steps))

    def trace(self, start=0, stop=None):
        """The routing of these steps as one sequence in cache.simulate's format: trace[s][l] = [[K ids] per token]."""
        return [s.routing for s in self.steps[start:stop]]


# ----------------------------------------------------------------------------------------------
# Slots and loads: the cache's memory, allocated once, and how an expert gets into a slot

def swiglu(x, gate_up, down):
    """One expert on its tokens x (n, D) -> (n, D): down @ (silu(gate @ x) * (up @ x)), as model.MLP, with
    gate and up stacked as gate_up (2F, D) so that one matmul computes both."""
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)  # (n, F) each
    return F.linear(F.silu(g) * u, down)


class ExpertSlots:
    """Weights of `capacity` experts of one MoE layer; slot s holds whichever expert the cache put there."""

    def __init__(self, capacity, D, F_, dtype, device):
        self.gate_up = torch.zeros(capacity, 2 * F_, D, dtype=dtype, device=device)  # (C, 2F, D): gate rows, then up
        self.down = torch.zeros(capacity, D, F_, dtype=dtype, device=device)         # (C, D, F)
        cuda = torch.device(device).type == "cuda"
        # per slot: "loaded" (recorded on the copy stream) and "no longer read" (on the compute stream)
        self.ready = [torch.cuda.Event() for _ in range(capacity)] if cuda else None
        self.free = [torch.cuda.Event() for _ in range(capacity)] if cuda else None
        # (gate (F, D), up (F, D), down (D, F)) per slot, the store's order: made once, not per token
        self.slot_views = [(*self.gate_up[s].chunk(2), self.down[s]) for s in range(capacity)]

    def views(self, s):
        return self.slot_views[s]

    def wait(self, slots):
        """On CUDA, make the compute stream wait until these slots' experts are loaded (and only these)."""
        if self.ready is not None:
            for s in slots:
                torch.cuda.current_stream(self.gate_up.device).wait_event(self.ready[s])

    def done(self, slots):
        """On CUDA, mark these slots as read, after every kernel that reads them has been queued."""
        if self.free is not None:
            for s in slots:
                self.free[s].record()

    def run(self, s, x):
        """The expert in slot s on x (n, D)."""
        self.wait([s])
        y = swiglu(x, self.gate_up[s], self.down[s])
        self.done([s])
        return y

    def run_together(self, s, x, weights):
        """sum_k weights[0, k] * (expert in slot s[k])(x) for one token x (1, D), s a (K,) tensor: one gather of
        the K slots and two batched matmuls instead of K expert calls, the same arithmetic in fewer dispatches."""
        h = self.gate_up.index_select(0, s) @ x[0]                          # (K, 2F, D) @ (D,) -> (K, 2F)
        g, u = h.chunk(2, dim=-1)                                            # (K, F) each
        a = F.silu(g) * u * weights[0, :, None].to(x.dtype)                  # (K, F), each expert's weight applied
        y = torch.bmm(self.down.index_select(0, s), a.unsqueeze(-1)).sum(0)  # (K, D, F) @ (K, F, 1) -> (D, 1)
        return y.view(1, -1)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))


class ExpertLoader:
    """Reads experts from the store into slots: on the CPU straight into the slot, a token's misses in one
    layer in parallel threads; on CUDA into one of two pinned host buffers (so reading the next expert
    overlaps the previous copy), then copied on the copy stream once the slot's previous expert has
    finished computing."""

    # Reads in flight at once on the CPU. A read between computations is slower than the same read back to
    # back (measured here with O_DIRECT: 147 KB experts 650-730 us against 580 us), so one at a time the
    # engine could not reach the disk's random-read bandwidth; a few in flight keep the device busy.
    READ_THREADS = 4

    def __init__(self, store, dtype, device):
        self.store, self.cuda = store, device.type == "cuda"
        self.staging, self.staging_done, self.turn = [], [], 0
        self.pool = None if self.cuda else ThreadPoolExecutor(self.READ_THREADS, thread_name_prefix="expert-read")
        if self.cuda:
            D, F_ = store.cfg.hidden_size, store.cfg.moe_intermediate_size
            self.stream = torch.cuda.Stream(device)
            for _ in range(2):
                self.staging.append(tuple(torch.empty(s, dtype=dtype, pin_memory=True) for s in ((F_, D), (F_, D), (D, F_))))
                self.staging_done.append(torch.cuda.Event())

    def load(self, layer, expert, slots, s):
        if not self.cuda:
            self.store.read_into(layer, expert, slots.views(s))
            return
        i, self.turn = self.turn, (self.turn + 1) % len(self.staging)
        self.staging_done[i].synchronize()  # the last copy out of this buffer is done
        self.store.read_into(layer, expert, self.staging[i])
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slots.free[s])
            for dst, src in zip(slots.views(s), self.staging[i]):
                dst.copy_(src, non_blocking=True)
            slots.ready[s].record(self.stream)
            self.staging_done[i].record(self.stream)

    def load_many(self, layer, loads, slots):
        """Load [(expert, slot)]: on the CPU all at once in the pool's threads, on CUDA one after another."""
        if self.pool is None or len(loads) < 2:
            for e, s in loads:
                self.load(layer, e, slots, s)
            return
        for done in [self.pool.submit(self.store.read_into, layer, e, slots.views(s)) for e, s in loads]:
            done.result()  # re-raises a failed read here

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()

    @property
    def nbytes(self):
        """Staging buffers (CUDA) and the store's O_DIRECT buffers, one per thread that has read (CPU)."""
        staging = sum(t.numel() * t.element_size() for buf in self.staging for t in buf)
        return staging + sum(len(b) for b in self.store.buffers.values())


# ----------------------------------------------------------------------------------------------
# The experts provider that model.MoE asks for its experts

class OffloadedExperts(nn.Module):
    """The routed experts of one MoE layer as the engine holds them: `capacity` slots filled from
    disk on demand. Same three methods as model.Experts: `bonus` (cache-aware routing), `fetch`
    and `run`."""

    # One token's K experts are computed together when their weights total less than this: a gather of
    # small experts costs about one matmul, and saves K - 1 of them plus 3 (K - 1) elementwise calls (the
    # default model: 4 x 147 KB). Larger experts are memory-bound matrix-vector products, and a gather
    # would copy every weight once more before reading it (DeepSeek-V2-Lite: 6 x 17 MB).
    TOGETHER_BELOW_BYTES = 4 << 20

    def __init__(self, layer, n_experts, slots, cache, loader, record, cache_bias=0.0, after=None):
        super().__init__()
        self.layer, self.n_experts, self.slots, self.cache = layer, n_experts, slots, cache
        self.loader, self.record, self.cache_bias = loader, record, cache_bias
        self.after = after  # called with the layer's input after it computed (the engine's prefetch)
        self.expert_bytes = slots.nbytes // cache.capacity  # one slot's weights
        self.slot_of = None  # (E,) tensor expert -> slot once every expert is resident for good (--compile)

    def bonus(self):
        """(E,) cache_bias on the experts cached now, or None for plain routing."""
        if not self.cache_bias or self.slot_of is not None:  # all cached: an equal bonus changes no choice
            return None
        bonus = torch.zeros(self.n_experts, device=self.slots.gate_up.device)
        bonus[list(self.cache.slot_of)] = self.cache_bias
        return bonus

    def fetch(self, indices, x):
        """(expert id, the expert in its slot) for every expert that `indices` (T, K) selects."""
        for e, slot in self.admit(indices, x):
            yield e, partial(self.slots.run, slot)

    def admit(self, indices, x):
        """route -> look up -> load -> (the caller computes) -> record: yields (expert id, slot). Experts
        come in order of first appearance (for one token: its top-k order), as cache.simulate replays
        them. When they all fit in the cache (a decode token) every one is looked up first and the misses
        are read together; otherwise one at a time, so that each is used before it is evicted."""
        ids = indices.tolist()  # (T, K) chosen experts, on the host: the cache is Python
        needed = needed_experts(ids)
        protect = step_protect(needed, self.cache.capacity)
        if len(needed) <= self.cache.capacity:
            access = [(e, self.cache.access(e, protect)) for e in needed]
            self.loader.load_many(self.layer, [(e, a.slot) for e, a in access if not a.hit], self.slots)
        else:
            access = ((e, self.take(e, protect)) for e in needed)  # lazily: each loaded just before its use
        hits = 0
        for e, a in access:
            hits += a.hit
            yield e, a.slot
        step = self.record.steps[-1]
        step.routing.append(ids)
        step.hits.append(hits)
        step.misses.append(len(needed) - hits)

    def take(self, e, protect):
        """Look expert e up; on a miss, load it into the slot the cache gave it."""
        a = self.cache.access(e, protect)
        if not a.hit:
            self.loader.load(self.layer, e, self.slots, a.slot)
        return a

    def run(self, x, indices, weights):
        """The routed part of the layer's output for x (N, D): one decode token with small experts that
        all fit in the cache at once computes them together (ExpertSlots.run_together), in its top-k
        order; anything else is model.run_experts' loop over `fetch`."""
        K = indices.shape[-1]
        if x.shape[0] == 1 and self.slot_of is not None:
            # every expert resident for good: the slots come from a tensor lookup, nothing goes to the host,
            # so a compiled decode step runs through (nothing to record either: every request hits)
            return self.slots.run_together(self.slot_of[indices[0]], x, weights)
        if x.shape[0] == 1 and K <= self.cache.capacity and K * self.expert_bytes < self.TOGETHER_BELOW_BYTES:
            slots = [slot for _, slot in self.admit(indices, x)]  # one token's K ids are distinct: slots[k] holds indices[0, k]
            self.slots.wait(slots)
            y = self.slots.run_together(torch.tensor(slots, device=x.device), x, weights)
            self.slots.done(slots)
        else:
            y = model.run_experts(x, indices, weights, self)
        if self.after is not None:  # after the layer's compute is queued, so that on CUDA the prefetch overlaps it
            self.after(self.layer, x)
        return y

    def prefetch(self, experts):
        """Load `experts` ahead, if not cached; not counted as requests."""
        protect = step_protect(experts, self.cache.capacity)
        for e in experts:
            if e not in self.cache.slot_of:
                self.loader.load(self.layer, e, self.slots, self.cache.access(e, protect, use=False).slot)
                self.record.steps[-1].prefetched += 1


# ----------------------------------------------------------------------------------------------
# The engine: model.py's model with an OffloadedExperts provider in every MoE layer

def rss_bytes():
    """This process's resident set size now (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class DecodeReport:
    prompt_ids: list
    generated_ids: list
    ttft_s: float               # prefill + first token
    time_per_token_s: float     # per decode step after the first token
    tokens_per_s: float         # decode steps per second
    hit_rate: float             # over decode steps
    loads_per_token: float      # experts read per decode step, all MoE layers together
    mb_read_per_token: float
    prefill_loads: int
    prefill_mb: float
    prefetch_loads: int
    expert_memory_mb: float     # slots + staging buffers: allocated once, so also the peak
    peak_rss_mb: float | None   # sampled before the first and after the last step (memory is allocated up
                                # front and the KV cache only grows; sampling every token cost ~16 us each)


class OffloadEngine:
    def __init__(self, path, opts=None):
        self.opts = opts = opts or OffloadConfig()
        self.path = Path(path)
        cfg = self.cfg = checkpoint.read_config(self.path)
        check_cache_size(cfg, opts.cache)
        if opts.compile and opts.cache != cfg.n_routed_experts:
            raise UserError(f"--compile needs every expert resident (--cache {cfg.n_routed_experts}), got --cache "
                            f"{opts.cache}: an offloaded layer reads its misses from disk between its router and its "
                            f"experts, which a compiled step cannot pause for")
        if opts.policy not in ("lru", "lfu"):
            raise UserError(f"--policy must be lru or lfu, got {opts.policy!r} (belady needs the future: "
                            f"use cache.simulate on a trace)")
        self.store = ExpertStore(self.path, cfg, opts.io)
        self.device, self.device_reason = cli.pick_device(opts.device)
        self.dtype, self.dtype_reason = cli.pick_dtype(self.device, checkpoint.stored_dtype(self.path), opts.dtype)
        self.model = checkpoint.load_model(self.path, self.device, self.dtype, experts_on_disk=True)
        self.store.drop_page_cache()  # a miss must be a read, even right after the checkpoint was written
        self.record, self.resident = Record(), False
        self.loader = ExpertLoader(self.store, self.dtype, self.device)
        self.moes = [b.mlp for b in self.model.model.layers if isinstance(b.mlp, model.MoE)]
        self.next_moe = dict(zip((m.layer for m in self.moes), self.moes[1:]))
        D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
        for moe in self.moes:
            moe.experts = OffloadedExperts(moe.layer, cfg.n_routed_experts,
                                           ExpertSlots(opts.cache, D, F_, self.dtype, self.device),
                                           ExpertCache(opts.cache, opts.policy), self.loader, self.record,
                                           opts.cache_bias, self._prefetch_next if opts.prefetch else None)
        self.compiled = self.compile_decode() if opts.compile else None

    @property
    def providers(self):
        return [m.experts for m in self.moes]

    @property
    def expert_memory_bytes(self):
        return sum(p.slots.nbytes for p in self.providers) + self.loader.nbytes

    @property
    def weight_bytes(self):
        """The resident (non-expert) weights, counted once even where tied."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    def reset_cache(self):
        """Empty every layer's cache (the slots keep stale weights that are never read again); an
        engine made all-resident by preload_all stays full."""
        if self.resident:
            return
        for p in self.providers:
            p.cache = ExpertCache(self.opts.cache, self.opts.policy)

    def preload_all(self):
        """Load every expert into a slot for good: the all-resident reference (cache == number of experts)."""
        if self.opts.cache != self.cfg.n_routed_experts:
            raise UserError(f"an all-resident engine needs --cache {self.cfg.n_routed_experts}, got {self.opts.cache}")
        for p in self.providers:
            for e in range(self.cfg.n_routed_experts):
                a = p.cache.access(e, use=False)
                if not a.hit:
                    self.loader.load(p.layer, e, p.slots, a.slot)
        self.synchronize()
        self.resident = True

    def compile_decode(self):
        """--compile: load every expert into its slot for good, give each layer its expert -> slot table as a
        tensor (so a decode token never goes to the host), and compile the one-token step: torch.compile
        with static shapes (the KV cache is a model.StaticKVCache) traces the whole forward pass once into
        fused kernels. Each cache size compiles once (tens of seconds on two CPU cores; a C++ compiler is
        needed): the smallest (256 positions) here, a larger one on its first step; the prompt's prefill
        runs uncompiled (its length varies)."""
        self.preload_all()
        for p in self.providers:
            slot_of = torch.empty(self.cfg.n_routed_experts, dtype=torch.long)
            for e, s in p.cache.slot_of.items():
                slot_of[e] = s
            p.slot_of = slot_of.to(self.device)
        # cpp_wrapper: the compiled step calls its kernels from C++, not Python (measured here: 1.5-2x more
        # tokens/s than the Python wrapper for the default model; freezing the weights did not help)
        compiled = torch.compile(self.model, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        # compile the smallest cache size now, so that no timed token of a short generation pays for it
        kv, token = self.new_kv_cache(1), torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            kv.seek(0, 1)
            self.model(token, kv_cache=kv)  # uncompiled, as a prefill: allocates the cache's buffers
            kv.seek(1, 1)
            try:
                compiled(token, kv_cache=kv)
            except Exception as e:  # no C++ compiler, or something torch.compile cannot trace on this setup
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"--compile failed ({first}); decode without --compile") from None
        return compiled

    def new_kv_cache(self, length):
        """A KV cache for `length` positions: a growing model.KVCache, or with --compile a fixed-size one,
        rounded up to a power of two so that a few compiled sizes serve every request."""
        if not self.opts.compile:
            return model.KVCache()
        return model.StaticKVCache(max(256, 1 << (length - 1).bit_length()), self.device)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self):
        self.loader.close()
        self.store.close()

    @torch.no_grad()
    def step(self, ids, kv):
        """ids (1, T) -> logits (1, T, V): one forward pass of model.py's model, recorded as one Step."""
        step = Step(tokens=ids.shape[1])
        self.record.steps.append(step)
        before = self.store.bytes_read
        if isinstance(kv, model.StaticKVCache):
            kv.seek(kv.length, ids.shape[1])  # outside the compiled step: this pass's positions
        if self.compiled is not None and ids.shape[1] == 1:
            logits = self.compiled(ids, kv_cache=kv)
            step.hits, step.misses = [self.cfg.num_experts_per_tok] * len(self.moes), [0] * len(self.moes)
        else:
            logits = self.model(ids, kv_cache=kv)
        step.bytes_read = self.store.bytes_read - before
        return logits

    def _prefetch_next(self, layer, x):
        """After MoE layer `layer` computed on x (one decode token), load what the next MoE layer's
        gate picks for x: a guess (that layer sees a later hidden state), so it can load unused experts."""
        nxt = self.next_moe.get(layer)
        if nxt is None or x.shape[0] != 1:
            return
        nxt.experts.prefetch(needed_experts(nxt.gate(x, nxt.experts.bonus())[0].tolist()))

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, generator=None, on_token=None):
        """Prefill, then decode one token at a time, as model.generate. Returns (ids (1, T+new), DecodeReport)."""
        ids = torch.as_tensor(prompt_ids, device=self.device).view(1, -1)
        first, kv, peak_rss = len(self.record.steps), self.new_kv_cache(ids.shape[1] + max_new_tokens), rss_bytes()
        self.synchronize()
        t0 = time.perf_counter()
        logits = self.step(ids, kv)[:, -1]
        tokens = []
        for i in range(max_new_tokens):
            nxt = model.sample_next(logits, temperature, top_p, generator)  # (1, 1)
            tokens.append(nxt.item())  # the host needs the id anyway: this is also the step's sync
            if i == 0:
                t_first = time.perf_counter()
            if on_token is not None:
                on_token(tokens[-1])
            if i + 1 < max_new_tokens:
                logits = self.step(nxt, kv)[:, -1]
        self.synchronize()
        t_end = time.perf_counter()
        rss = rss_bytes()
        peak_rss = max(peak_rss, rss) if rss is not None and peak_rss is not None else None
        steps = max_new_tokens - 1  # decode steps after the prefill
        dec, pre = self.record.totals(first + 1), self.record.totals(first, first + 1)
        per = (lambda x: x / steps) if steps else (lambda x: float("nan"))
        report = DecodeReport(
            prompt_ids=ids[0].tolist(), generated_ids=tokens, ttft_s=t_first - t0,
            time_per_token_s=per(t_end - t_first), tokens_per_s=steps / (t_end - t_first) if steps else float("nan"),
            hit_rate=dec.hit_rate, loads_per_token=dec.loads_per_token, mb_read_per_token=dec.mb_per_token,
            prefill_loads=pre.misses, prefill_mb=pre.bytes_read / 1e6, prefetch_loads=self.record.totals(first).prefetched,
            expert_memory_mb=self.expert_memory_bytes / 1e6, peak_rss_mb=peak_rss / 1e6 if peak_rss is not None else None)
        out = torch.cat([ids, torch.tensor([tokens], device=self.device)], dim=1)
        return out, report

    @torch.no_grad()
    def replay(self, window, prompt_len):
        """Teacher forcing: prefill window[:prompt_len], then feed the rest token by token, from a cold
        cache. Returns (seconds of the token-by-token part, its Totals, logits (len - prompt_len, V)
        predicting window[prompt_len + 1:] and one token beyond)."""
        ids = torch.as_tensor(window, device=self.device).view(1, -1)
        self.reset_cache()
        self.store.drop_page_cache()
        kv = self.new_kv_cache(ids.shape[1])
        self.step(ids[:, :prompt_len], kv)
        first = len(self.record.steps)
        self.synchronize()
        t0 = time.perf_counter()
        logits = [self.step(ids[:, t:t + 1], kv)[0, -1] for t in range(prompt_len, ids.shape[1])]
        self.synchronize()
        return time.perf_counter() - t0, self.record.totals(first), torch.stack(logits)


# ----------------------------------------------------------------------------------------------
# Benchmarks: the same tokens for every contender, and the engine against the physical bound

def t_interval(values, confidence=0.95):
    """(mean, half-width) of the `confidence` t-interval of the mean of `values` (nan half-width for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(n - 1, confidence) * sd / math.sqrt(n)


def t_quantile(dof, confidence):
    """Two-sided Student t quantile, by bisection on the regularized incomplete beta (no SciPy)."""
    target = (1 - confidence) / 2  # upper-tail mass

    def upper_tail(t):  # P(T > t) = I_{dof/(dof+t^2)}(dof/2, 1/2) / 2
        return 0.5 * betainc(dof / 2, 0.5, dof / (dof + t * t))

    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_tail(mid) > target else (lo, mid)
    return (lo + hi) / 2


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1 + num / c
        c = c if abs(c) > 1e-30 else 1e-30
        f *= c * d
        if abs(1 - c * d) < 1e-12:
            break
    return front * (f - 1)


def same_token_decode(engines, windows, prompt_len, warmup=1, log=None):
    """Every engine (a dict name -> OffloadEngine) replays the same test windows (N, P + C): prefill
    P tokens, then C tokens one by one, each window from a cold cache with the page cache dropped.
    Contenders take turns in A B B A order (the order flips every window) so that drift in the
    machine's speed hits all alike; the first `warmup` windows are run and discarded. Returns
    {name: per-window lists} of seconds per token, loads, MB and hits per token, and the NLL."""
    names = list(engines)
    runs = {name: {"s_per_token": [], "loads_per_token": [], "mb_per_token": [], "hit_rate": [], "nll": [],
                   "tokens": 0} for name in names}
    for i, window in enumerate(windows):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds, tot, logits = engines[name].replay(window, prompt_len)
            if i < warmup:
                continue
            r, C = runs[name], tot.tokens
            r["s_per_token"].append(seconds / C)
            r["loads_per_token"].append(tot.loads_per_token)
            r["mb_per_token"].append(tot.mb_per_token)
            r["hit_rate"].append(tot.hit_rate)
            targets = torch.as_tensor(window[prompt_len + 1:], device=logits.device)
            r["nll"].append(F.cross_entropy(logits[:-1].float(), targets, reduction="sum").item())
            r["tokens"] += C - 1
        if log is not None:
            log(i + 1, len(windows))
    return runs


def summarize_runs(runs, baseline):
    """Mean ms/token with its 95% interval over windows, loads and MB per token, hit rate, perplexity,
    and each contender's speedup over `baseline`: the geometric mean over windows of the paired
    ratio baseline time / contender time, with the 95% interval of that mean (on the log scale)."""
    out = {}
    for name, r in runs.items():
        ms, ms_ci = t_interval([s * 1e3 for s in r["s_per_token"]])
        log_ratio = [math.log(b / s) for b, s in zip(runs[baseline]["s_per_token"], r["s_per_token"])]
        lr, lr_ci = t_interval(log_ratio)
        out[name] = {"windows": len(r["s_per_token"]), "ms_per_token": ms, "ms_per_token_ci95": ms_ci,
                     "loads_per_token": sum(r["loads_per_token"]) / len(r["loads_per_token"]),
                     "mb_per_token": sum(r["mb_per_token"]) / len(r["mb_per_token"]),
                     "hit_rate": sum(r["hit_rate"]) / len(r["hit_rate"]),
                     "perplexity": math.exp(sum(r["nll"]) / r["tokens"]),
                     "speedup": math.exp(lr), "speedup_ci95": [math.exp(lr - lr_ci), math.exp(lr + lr_ci)]}
    return out


def physical_bound(path, windows, prompt_len, capacities, opts=None, log=print):
    """Offloaded decoding at each capacity (O_DIRECT) against the bound it should approach:
    resident time per token (all experts in slots, the same code) + bytes missed per token /
    bandwidth, where the bandwidth is measured with random O_DIRECT reads of single experts (a miss
    is a random read, not a sequential sweep). All engines replay the same windows, interleaved. The engine
    reads a token's misses in a layer up to ExpertLoader.READ_THREADS at a time, so each row also has the
    stricter bound at the bandwidth of that many reads in flight."""
    opts = opts or OffloadConfig()
    cfg = checkpoint.read_config(path)
    with ExpertStore(path, cfg, "direct") as store:
        if store.fallback:
            log(f"note: {store.fallback}")
        bandwidth = max(read_bandwidth(store, list(store.parts), seed=i) for i in range(3))
        parallel = max(read_bandwidth(store, list(store.parts), i, ExpertLoader.READ_THREADS) for i in range(3))
    log(f"disk: {bandwidth / 1e6:.1f} MB/s reading single {store.expert_bytes / 1e6:.3f} MB experts in random "
        f"order ({'O_DIRECT' if not store.fallback else 'mmap, O_DIRECT unavailable'}), {parallel / 1e6:.1f} MB/s "
        f"with {ExpertLoader.READ_THREADS} in flight")
    E = cfg.n_routed_experts
    engines = {"resident": OffloadEngine(path, replace(opts, cache=E, io="direct"))}
    engines["resident"].preload_all()
    for c in capacities:
        engines[f"cache {c}"] = OffloadEngine(path, replace(opts, cache=c, io="direct"))
    try:
        runs = summarize_runs(same_token_decode(engines, windows, prompt_len), "resident")
    finally:
        for e in engines.values():
            e.close()
    resident = runs["resident"]["ms_per_token"]
    rows = []
    for c in capacities:
        r = runs[f"cache {c}"]
        bound = resident + r["mb_per_token"] * 1e6 / bandwidth * 1e3
        strict = resident + r["mb_per_token"] * 1e6 / parallel * 1e3
        rows.append({"cache": c, "ms_per_token": r["ms_per_token"], "ms_per_token_ci95": r["ms_per_token_ci95"],
                     "bound_ms": bound, "ratio_to_bound": r["ms_per_token"] / bound,
                     "bound_parallel_ms": strict, "ratio_to_parallel_bound": r["ms_per_token"] / strict,
                     "mb_per_token": r["mb_per_token"], "loads_per_token": r["loads_per_token"],
                     "hit_rate": r["hit_rate"]})
    return {"bandwidth_bytes_per_s": bandwidth, "parallel_bandwidth_bytes_per_s": parallel, "resident_ms_per_token": resident,
            "resident_ms_per_token_ci95": runs["resident"]["ms_per_token_ci95"], "rows": rows}


# ----------------------------------------------------------------------------------------------
# Command line

class TextStream:
    """Prints generated text as it comes, holding back a token that ends inside a UTF-8 character."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def __call__(self, token):
        self.ids.append(token)
        if self.tok is None:
            print(f" {token}", end="", flush=True)
            return
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)


def parse_args(argv=None):
    d = OffloadConfig()
    p = cli.ArgumentParser(description="Decode with routed experts on disk and an expert cache per MoE layer.")
    g = p.add_argument_group("model and prompt")
    g.add_argument("--model", default=None, help=f"checkpoint folder (default: {cli.DEFAULT_TUNED_DIR} if it "
                                                 f"exists, else {cli.DEFAULT_BASE_DIR})")
    g.add_argument("--prompt", default="def main():", help="text to continue (needs tokenizer.json in the folder)")
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt "
                                                      "(for checkpoints without a tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g = p.add_argument_group("expert cache")
    g.add_argument("--cache", type=int, default=d.cache, help="experts per MoE layer held in memory")
    g.add_argument("--policy", choices=("lru", "lfu"), default=d.policy, help="eviction policy")
    g.add_argument("--io", choices=("mmap", "direct"), default=d.io, help="mmap (as llama.cpp) or O_DIRECT reads")
    g.add_argument("--cache-bias", type=float, default=d.cache_bias,
                   help="bonus on cached experts' router scores before top-k (0 = plain routing)")
    g.add_argument("--prefetch", action="store_true", help="load the next MoE layer's predicted experts early")
    g.add_argument("--compile", action="store_true", help="with --cache = all experts: compile the decode step "
                                                          "(torch.compile; tens of seconds once, needs a C++ compiler)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                   help="compute dtype (default: float32 on CPU; on CUDA the checkpoint's own dtype)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default); small "
                                                          "models on a busy machine often decode faster with 1")
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="write the figures and the prompt's and generated token ids here")
    g = p.add_argument_group("benchmark (--bench): the same held-out tokens for every contender, and the I/O bound")
    g.add_argument("--bench", action="store_true", help="decode held-out test windows (teacher forcing) with every "
                                                        "--bench-models model, plain and with --cache-bias, interleaved; "
                                                        "then time per token against the physical bound")
    g.add_argument("--bench-models", nargs="+", default=None,
                   help=f"models to compare, the first the baseline (default: {cli.DEFAULT_BASE_DIR} and "
                        f"{cli.DEFAULT_TUNED_DIR}, else --model)")
    g.add_argument("--data", default=None, help="text whose test split gives the windows (default: the Python stdlib)")
    g.add_argument("--data-dir", default=str(cli.DEFAULT_RUN / "data"), help="token cache (default: %(default)s)")
    g.add_argument("--bench-windows", type=int, default=16, help="windows per contender, after one warm-up "
                                                                 "(default: %(default)s)")
    g.add_argument("--bench-prompt", type=int, default=32, help="tokens prefilled per window (default: %(default)s)")
    g.add_argument("--bench-tokens", type=int, default=64, help="tokens fed one by one per window (default: %(default)s)")
    return p.parse_args(argv)


def prompt_token_ids(args, tok, cfg):
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise UserError(f"--prompt-ids must be in 0..{cfg.vocab_size - 1}, got {bad[0]}")
        return ids
    if tok is None:
        raise UserError(f"{args.model}: no tokenizer.json to encode --prompt; pass --prompt-ids instead")
    return tok.encode(args.prompt).ids


def bench_windows(args, path):
    """(N + 1, P + C) windows of the test split (the first a warm-up), tokenized as the model's tokenizer does."""
    from data import DataConfig, eval_windows, prepare_data  # data.py is only needed here
    if checkpoint.load_tokenizer(path) is None:
        raise UserError(f"{path}: no tokenizer.json to tokenize the benchmark's text")
    _, _, data = prepare_data(DataConfig(data=args.data), Path(args.data_dir), Path(path))
    length = args.bench_prompt + args.bench_tokens
    if len(data.test) < (args.bench_windows + 1) * length:
        raise UserError(f"the test split has {len(data.test)} tokens, fewer than --bench-windows + 1 = "
                        f"{args.bench_windows + 1} windows of --bench-prompt + --bench-tokens = {length}")
    return eval_windows(data.test, length - 1, args.bench_windows + 1)


def run_bench(args, opts, log=print):
    """--bench: the same-token decode table, then the physical-bound table of the first model."""
    paths = args.bench_models or [str(p) for p in (cli.DEFAULT_BASE_DIR, cli.DEFAULT_TUNED_DIR) if p.is_dir()]
    paths = paths or [args.model]
    cfgs = [checkpoint.read_config(p) for p in paths]
    for p, c in zip(paths[1:], cfgs[1:]):
        if asdict(c) != asdict(cfgs[0]):
            raise UserError(f"{p} and {paths[0]} have different architectures; --bench compares twins (same experts)")
    cfg, K = cfgs[0], cfgs[0].num_experts_per_tok
    for c in {args.cache, K, min(2 * K, cfg.n_routed_experts), min(4 * K, cfg.n_routed_experts)}:
        check_cache_size(cfg, c)
    if min(args.bench_windows, args.bench_prompt, args.bench_tokens) < 1:
        raise UserError("--bench-windows, --bench-prompt and --bench-tokens must be >= 1")
    check_prompt(cfg, args.bench_prompt, args.bench_tokens)
    windows = bench_windows(args, paths[0])
    engines = {}
    for p in paths:
        for bias in sorted({0.0, args.cache_bias}):
            name = Path(p).name + (f" + cache-aware {bias:g}" if bias else "")
            engines[name] = OffloadEngine(p, replace(opts, io="direct", cache_bias=bias))
    first = next(iter(engines.values()))
    log(f"{len(windows) - 1} test windows (+1 warm-up) of {args.bench_prompt} prompt + {args.bench_tokens} tokens fed "
        f"one by one, cache {args.cache}/layer, {first.device}, io {first.store.io}"
        + (f" ({first.store.fallback})" if first.store.fallback else ""))
    try:
        runs = same_token_decode(engines, windows, args.bench_prompt,
                                 log=lambda i, n: print(f"\rwindow {i}/{n}", end="", file=sys.stderr, flush=True))
        print(file=sys.stderr)
    finally:
        for e in engines.values():
            e.close()
    summary = summarize_runs(runs, next(iter(engines)))
    log(f"{'contender':36s} {'ms/token':>16s} {'speedup (95% CI)':>22s} {'hit rate':>8s} {'loads/tok':>9s} "
        f"{'MB/tok':>7s} {'perplexity':>10s}")
    for name, s in summary.items():
        log(f"{name:36s} {s['ms_per_token']:9.2f} ± {s['ms_per_token_ci95']:4.2f} {s['speedup']:9.2f}x "
            f"[{s['speedup_ci95'][0]:.2f}, {s['speedup_ci95'][1]:.2f}] {s['hit_rate']:8.3f} {s['loads_per_token']:9.2f} "
            f"{s['mb_per_token']:7.3f} {s['perplexity']:10.3f}")
    caps = sorted({K, min(2 * K, cfg.n_routed_experts), min(4 * K, cfg.n_routed_experts)})
    bound = physical_bound(paths[0], windows, args.bench_prompt, caps, replace(opts, cache_bias=0.0), log)
    log(f"resident (all {cfg.n_routed_experts} experts in slots, the same code): {bound['resident_ms_per_token']:.2f} "
        f"± {bound['resident_ms_per_token_ci95']:.2f} ms/token")
    log(f"{'cache':>5s} {'ms/token':>16s} {'bound ms':>9s} {'ratio':>6s} {'bound ms, reads in flight':>26s} {'ratio':>6s} "
        f"{'MB/token':>9s} {'hit rate':>8s}")
    for r in bound["rows"]:
        log(f"{r['cache']:5d} {r['ms_per_token']:9.2f} ± {r['ms_per_token_ci95']:4.2f} {r['bound_ms']:9.2f} "
            f"{r['ratio_to_bound']:6.2f} {r['bound_parallel_ms']:26.2f} {r['ratio_to_parallel_bound']:6.2f} "
            f"{r['mb_per_token']:9.3f} {r['hit_rate']:8.3f}")
    return {"models": paths, "windows": windows.tolist(), "prompt_tokens": args.bench_prompt,
            "decode_tokens": args.bench_tokens, "cache": args.cache, "contenders": summary, "per_window": runs,
            "bound": bound, "device": str(first.device), "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse_args(argv)
    args.model = args.model or str(cli.default_model_dir())
    opts = OffloadConfig(cache=args.cache, policy=args.policy, io=args.io, device=args.device, dtype=args.dtype,
                         cache_bias=args.cache_bias, prefetch=args.prefetch, compile=args.compile)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.bench:
        with cli.user_errors():
            if args.compile:
                raise UserError("--bench times the offloaded engine, which runs uncompiled; the compiled resident "
                                "engine is timed in bench.py's peers section")
            result = run_bench(args, opts)
            if args.json:
                cli.write_json(args.json, result)
        return
    with cli.user_errors():
        # every check on user input comes before the (slow) load
        cfg = checkpoint.read_config(args.model)
        check_cache_size(cfg, args.cache)
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
        tok = checkpoint.load_tokenizer(args.model)
        prompt = prompt_token_ids(args, tok, cfg)
        check_prompt(cfg, len(prompt), args.max_new_tokens)
        if args.compile and args.cache == cfg.n_routed_experts:  # (else the engine refuses, in one line)
            print("compiling the decode step (torch.compile: tens of seconds the first time)", file=sys.stderr)
        engine = OffloadEngine(args.model, opts)
    dtype = str(engine.dtype).removeprefix("torch.")
    print(f"device: {engine.device} ({engine.device_reason}); dtype: {dtype} ({engine.dtype_reason}); "
          f"{torch.get_num_threads()} CPU threads", file=sys.stderr)
    if engine.store.fallback:
        print(f"note: {engine.store.fallback}", file=sys.stderr)
    print(f"{args.model}: {cfg.model_type}, {len(cfg.moe_layers)} MoE layers x {cfg.n_routed_experts} experts "
          f"(top-{cfg.num_experts_per_tok}), cache {args.cache}/layer, {args.policy}, io {engine.store.io}",
          file=sys.stderr)
    print(tok.decode(prompt) if tok is not None else " ".join(map(str, prompt)), end="", flush=True)
    gen = torch.Generator(device=engine.device).manual_seed(args.seed)
    _, r = engine.generate(prompt, args.max_new_tokens, args.temperature, args.top_p, gen, TextStream(tok))
    engine.close()
    print()
    print(f"time to first token {r.ttft_s * 1e3:.1f} ms | {r.time_per_token_s * 1e3:.2f} ms/token | "
          f"{r.tokens_per_s:.1f} tokens/s")
    print(f"hit rate {r.hit_rate:.3f} | {r.loads_per_token:.2f} expert loads/token | "
          f"{r.mb_read_per_token:.3f} MB read/token | peak resident expert memory {r.expert_memory_mb:.2f} MB"
          + (f" | peak RSS {r.peak_rss_mb:.0f} MB" if r.peak_rss_mb is not None else ""))
    if args.json:
        figures = dict(model=str(args.model), **asdict(opts), **asdict(r))
        figures.update(device=str(engine.device), dtype=dtype, threads=torch.get_num_threads())
        cli.write_json(args.json, figures)


if __name__ == "__main__":
    main()
