"""
offload_infer.py: decode a MoE model whose routed experts stay on disk, holding only `--cache` experts
per MoE layer in preallocated slots (or as many as fit in `--budget`: budget.py).

What it teaches: offloading is a different *experts provider* inside each MoE layer, not a different
model. model.py's MoE layer asks its provider for the experts its router chose; `OffloadedExperts`
answers from `capacity` slots: look up the cache (cache.py), load the misses from the safetensors files
(store.py), compute, record. All else stays resident, and the expert memory is fixed before the first
token. Follows: Eliseev & Mazur 2023 (mixtral-offloading), llama.cpp (mmap). Leaves out: batches of
sequences, quantized compute, multi-GPU. The benchmarks of this engine are in bench.py.

    python offload_infer.py --prompt "def main():" --max-new-tokens 40    # CPU or GPU, cache 8, sampled
    python offload_infer.py --cache 4 --policy lfu --io direct --temperature 0 --json runs/decode.json
    python offload_infer.py --budget 15MB --json runs/decode.json           # the largest cache that fits 15 MB
    python offload_infer.py --cache 32 --compile                           # every expert resident, compiled

Shapes: T tokens in the step, D hidden, E routed experts, K top-k, F expert width, C slots per layer.
"""

import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

import budget
import checkpoint
import cli
import model
from cache import ExpertCache, needed_experts, step_protect
from cli import UserError
from record import DecodeReport, Record, Step, rss_bytes
from store import ExpertStore


@dataclass
class OffloadConfig:
    cache: int = 8             # experts per MoE layer held in slots
    policy: str = "lru"        # eviction policy: "lru" or "lfu" (Belady needs the future: traces only)
    io: str = "mmap"           # "mmap" or "direct" (O_DIRECT)
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None   # None: float32 on CPU; on CUDA the checkpoint's own dtype (bf16 for FP8)
    cache_bias: float = 0.0    # bonus added to cached experts' router scores before top-k (0: plain routing)
    cache_keep: int | None = None  # guaranteed mode (model.guaranteed_topk): keep each token's true top-J ...
    cache_margin: float = 0.0      # ... and fill the other K - J with cached experts within this score margin
    prefetch: bool = False     # load the next MoE layer's predicted experts while this layer computes
    compile: bool = False      # every expert resident (cache = E): compile the decode step with torch.compile
    budget: str | None = None  # "15MB", "6GB", "512MiB" or "auto": the memory that picks `cache` (budget.py)
    positions: int = 0         # with a budget: the KV cache length to leave room for (prompt + new tokens)


def check_cache_size(cfg, capacity):
    if not cfg.moe_layers or cfg.n_routed_experts == 0:
        raise UserError(f"{cfg.model_type} config has no MoE layers: nothing to offload")
    if not 1 <= capacity <= cfg.n_routed_experts:
        raise UserError(f"--cache must be between 1 and the number of routed experts "
                        f"({cfg.n_routed_experts}), got {capacity}")


# ----------------------------------------------------------------------------------------------
# Slots: the cache's memory, allocated once

class ExpertSlots:
    """Weights of `capacity` experts of one MoE layer; slot s holds whichever expert the cache put there.
    On CUDA each slot has two events: "loaded" (recorded on the copy stream; compute waits for it) and
    "no longer read" (recorded on the compute stream; the next load into the slot waits for it), so
    compute waits only for the experts it needs."""

    def __init__(self, capacity, shapes, dtype, device):
        # gate (C, F, D), up (C, F, D), down (C, D, F): index s of each is slot s
        self.gate, self.up, self.down = (torch.zeros(capacity, *s, dtype=dtype, device=device) for s in shapes)
        cuda = torch.device(device).type == "cuda"
        self.ready = [torch.cuda.Event() for _ in range(capacity)] if cuda else None
        self.free = [torch.cuda.Event() for _ in range(capacity)] if cuda else None
        # (gate (F, D), up (F, D), down (D, F)) per slot, the store's order: made once, not per token
        self.slot_views = [(self.gate[s], self.up[s], self.down[s]) for s in range(capacity)]

    def views(self, s):
        return self.slot_views[s]

    def wait(self, slots):
        """On CUDA, make the compute stream wait until these slots' experts are loaded (and only these)."""
        for s in slots if self.ready is not None else ():
            torch.cuda.current_stream(self.gate.device).wait_event(self.ready[s])

    def done(self, slots):
        """On CUDA, mark these slots as read, after every kernel that reads them has been queued."""
        for s in slots if self.free is not None else ():
            self.free[s].record()

    def run(self, s, x):
        """The expert in slot s on its tokens x (n, D) -> (n, D)."""
        self.wait([s])
        y = model.swiglu(x, *self.slot_views[s])
        self.done([s])
        return y

    def run_together(self, s, x, weights):
        """sum_k weights[0, k] * (expert in slot s[k])(x) for one token x (1, D), s a (K,) tensor: one gather
        of the K slots and one batched SwiGLU instead of K expert calls, the same arithmetic in fewer calls."""
        gate, up, down = (w.index_select(0, s) for w in (self.gate, self.up, self.down))  # (K, F, D) x 2, (K, D, F)
        y = model.swiglu(x, gate, up, down)  # (1, D) through each of the K experts -> (K, 1, D)
        return weights.to(x.dtype) @ y[:, 0]  # (1, K) @ (K, D) -> (1, D)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


# ----------------------------------------------------------------------------------------------
# Loader: how experts get from the store into their slots

class ExpertLoader:
    """Reads experts from the store into slots, a token's misses in one layer several at once (in threads).
    On the CPU each read lands straight in its slot. On CUDA it lands in a pinned host buffer of its own,
    then is copied into the slot on a copy stream once the slot's previous expert has finished computing,
    so reads overlap each other and the copies."""

    READ_THREADS = 4  # reads in flight: one at a time leaves the disk idle between computations

    def __init__(self, store, dtype, device):
        self.store, self.cuda = store, device.type == "cuda"
        self.pool = ThreadPoolExecutor(self.READ_THREADS, thread_name_prefix="expert-read")
        self.staging = queue.Queue()  # CUDA: (pinned (gate, up, down), "its copy is done" event), one per read in flight
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            for _ in range(self.READ_THREADS):
                self.staging.put((tuple(torch.empty(s, dtype=dtype, pin_memory=True) for s in store.shapes),
                                  torch.cuda.Event()))

    def load_many(self, layer, misses, slots):
        """Read every cache.Access in `misses` (an expert and the slot it was given) of MoE layer `layer`."""
        if len(misses) == 1:
            self.load(layer, misses[0].expert, slots, misses[0].slot)
            return
        for done in [self.pool.submit(self.load, layer, a.expert, slots, a.slot) for a in misses]:
            done.result()  # re-raises a failed read here

    def load(self, layer, expert, slots, s):
        if not self.cuda:
            self.store.read_into(layer, expert, slots.views(s))
            return
        buffers, copied = self.staging.get()
        try:
            copied.synchronize()  # the last copy out of this buffer is done
            self.store.read_into(layer, expert, buffers)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(slots.free[s])
                for dst, src in zip(slots.views(s), buffers):
                    dst.copy_(src, non_blocking=True)
                slots.ready[s].record(self.stream)
                copied.record(self.stream)
        finally:
            self.staging.put((buffers, copied))

    def close(self):
        self.pool.shutdown()

    @property
    def nbytes(self):
        """Pinned staging buffers (CUDA) and the store's O_DIRECT buffers, one per thread that has read."""
        staging = sum(t.numel() * t.element_size() for buffers, _ in list(self.staging.queue) for t in buffers)
        return staging + sum(len(b) for b in self.store.buffers.values())


# ----------------------------------------------------------------------------------------------
# The experts provider that model.MoE asks for its experts

class OffloadedExperts(nn.Module):
    """The routed experts of one MoE layer as the engine holds them: `capacity` slots filled from disk on
    demand. The same three methods as model.Experts: `steer` (cache-aware routing), `fetch` and `run`."""

    # a decode token's K experts run together while the gather of their weights costs less than the K - 1
    # expert calls it saves; larger experts are memory-bound, and a gather would copy them once more
    TOGETHER_BELOW_BYTES = 4 << 20

    def __init__(self, layer, n_experts, slots, cache, loader, record, opts=None, after=None, gate=None):
        super().__init__()
        self.layer, self.n_experts, self.slots, self.cache = layer, n_experts, slots, cache
        self.loader, self.record, self.opts = loader, record, opts or OffloadConfig()
        self.steered = bool(self.opts.cache_bias) or self.opts.cache_keep is not None  # cache-aware routing
        self.true_routing = gate.forward if gate is not None else None  # the layer's own router (not a submodule)
        self.after = after  # called with the layer's input after it computed (the engine's prefetch)
        self.expert_bytes = slots.nbytes // cache.capacity  # one slot's weights
        self.slot_of = None  # (E,) tensor expert -> slot once every expert is resident for good (--compile)

    def steer(self):
        """model.Gate's arguments for the cached experts: a bonus, the guaranteed mode or none (plain routing).
        Trades quality for hits without training; ReMoE teaches the router to prefer recent experts instead."""
        if not self.steered or self.slot_of is not None:
            return {}
        cached, o = torch.zeros(self.n_experts, dtype=torch.bool, device=self.slots.gate.device), self.opts
        cached[list(self.cache.slot_of)] = True
        if o.cache_keep is not None:
            return {"cached": cached, "keep": o.cache_keep, "margin": o.cache_margin}
        return {"bonus": cached * o.cache_bias}

    def fetch(self, indices, x):
        """(expert id, the expert in its slot) for every expert that `indices` (T, K) selects."""
        for e, slot in self.admit(indices):
            yield e, partial(self.slots.run, slot)

    def admit(self, indices):
        """Look up -> load the misses -> yield (expert id, slot) -> record. Experts come in order of first
        appearance (for one token: its top-k order), as cache.simulate replays them. When they all fit (a
        decode token) all are looked up first and the misses read together; otherwise (a long prompt) they
        stream through the slots one at a time, each used before it is evicted."""
        ids = indices.tolist()  # (T, K) chosen experts, on the host: the cache is Python
        needed = needed_experts(ids)
        protect = step_protect(needed, self.cache.capacity)
        groups = [needed] if len(needed) <= self.cache.capacity else [[e] for e in needed]
        hits = 0
        for group in groups:
            accesses = [self.cache.access(e, protect) for e in group]
            self.load([a for a in accesses if not a.hit])
            for a in accesses:
                hits += a.hit
                yield a.expert, a.slot
        step = self.record.steps[-1]
        step.routing.append(ids)
        step.hits.append(hits)
        step.misses.append(len(needed) - hits)

    def run(self, x, indices, weights):
        """The routed part of the layer's output for x (N, D): one decode token with small experts that
        all fit in the cache computes them together (ExpertSlots.run_together); anything else is
        model.run_experts' loop over `fetch`."""
        K = indices.shape[-1]
        if x.shape[0] == 1 and self.slot_of is not None:
            # every expert resident for good: a tensor lookup, so a compiled step runs through (all requests hit)
            return self.slots.run_together(self.slot_of[indices[0]], x, weights)
        if self.steered:  # record how far the steered choice is from the router's own
            true, _, scores = self.true_routing(x)
            agreement, kl = model.routing_drift(scores, true, indices)  # (T,) each
            self.record.steps[-1].agreement.append(agreement.mean())  # read back once, by Record.totals
            self.record.steps[-1].kl.append(kl.mean())
        if x.shape[0] == 1 and K <= self.cache.capacity and K * self.expert_bytes < self.TOGETHER_BELOW_BYTES:
            slots = [slot for _, slot in self.admit(indices)]  # K distinct ids: slots[k] holds indices[0, k]
            self.slots.wait(slots)
            y = self.slots.run_together(torch.tensor(slots, device=x.device), x, weights)
            self.slots.done(slots)
        else:
            y = model.run_experts(x, indices, weights, self)
        if self.after is not None:  # after the layer's compute is queued, so that on CUDA the prefetch overlaps it
            self.after(self.layer, x)
        return y

    def load(self, misses):
        """Read these cache.Access misses into their slots; the bytes read count against this layer."""
        before = self.loader.store.bytes_read
        self.loader.load_many(self.layer, misses, self.slots)
        self.record.steps[-1].layer_bytes[self.layer] += self.loader.store.bytes_read - before

    def prefetch(self, experts):
        """Load `experts` ahead, if not cached; not counted as requests."""
        protect = step_protect(experts, self.cache.capacity)
        for e in experts:
            if e not in self.cache.slot_of:
                self.load([self.cache.access(e, protect, use=False)])
                self.record.steps[-1].prefetched += 1


class CUDAGraphStep:
    """CUDA: a compiled one-token step on one static KV cache, recorded once as a CUDA graph and replayed,
    so a token costs one launch instead of one per kernel. What the graph reads never moves: the cache's
    buffers, and the position and mask tensors that StaticKVCache.seek rewrites in place."""

    def __init__(self, step, kv):
        device = kv.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        kv.seek(1, 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the recording (workspaces, lazy initialisation)
            step(self.ids, kv_cache=kv)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.ids, kv_cache=kv)  # (1, 1, V), rewritten by every replay

    def __call__(self, ids):
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()


# ----------------------------------------------------------------------------------------------
# The engine: model.py's model with an OffloadedExperts provider in every MoE layer, and its record

class OffloadEngine:
    def __init__(self, path, opts=None):
        self.opts = opts = opts or OffloadConfig()
        self.path = Path(path)
        cfg = self.cfg = checkpoint.read_config(self.path)
        check_cache_size(cfg, opts.cache if opts.budget is None else 1)
        if opts.compile and (opts.cache != cfg.n_routed_experts or opts.budget is not None):
            raise UserError(f"--compile needs every expert resident (--cache {cfg.n_routed_experts}), got --cache "
                            f"{opts.cache}: an offloaded layer reads its misses from disk between its router and its "
                            f"experts, which a compiled step cannot pause for")
        keep, K = opts.cache_keep, cfg.num_experts_per_tok
        if keep is not None and (opts.cache_bias or not 0 <= keep <= K or not opts.cache_margin >= 0):
            raise UserError(f"--cache-keep must be in 0..{K} (top-k) with --cache-margin >= 0 and no --cache-bias, "
                            f"got {keep}, {opts.cache_margin:g} and {opts.cache_bias:g}")
        if opts.policy not in ("lru", "lfu"):
            raise UserError(f"--policy must be lru or lfu, got {opts.policy!r} (belady needs the future: "
                            f"use cache.simulate on a trace)")
        self.store = ExpertStore(self.path, cfg, opts.io)
        self.device, self.device_reason = cli.pick_device(opts.device)
        self.dtype, self.dtype_reason = cli.pick_dtype(self.device, checkpoint.stored_dtype(self.path), opts.dtype)
        self.split = None if opts.budget is None else budget.plan(  # the largest cache that fits, before the load
            opts.budget, cfg, self.store, self.device, self.dtype, opts.positions, ExpertLoader.READ_THREADS)
        self.opts = opts = opts if self.split is None else replace(opts, cache=self.split.cache)
        self.model = checkpoint.load_model(self.path, self.device, self.dtype, experts_on_disk=True)
        self.store.drop_page_cache()  # a miss must be a read, even right after the checkpoint was written
        self.record, self.resident = Record(), False
        self.loader = ExpertLoader(self.store, self.dtype, self.device)
        self.moes = self.model.moes()
        self.next_moe = dict(zip((m.layer for m in self.moes), self.moes[1:]))
        for moe in self.moes:
            moe.experts = OffloadedExperts(moe.layer, cfg.n_routed_experts,
                                           ExpertSlots(opts.cache, self.store.shapes, self.dtype, self.device),
                                           ExpertCache(opts.cache, opts.policy), self.loader, self.record,
                                           opts, self._prefetch_next if opts.prefetch else None, moe.gate)
        self.compiled = None
        if opts.compile:
            self.compile_decode()

    @property
    def providers(self):
        return [m.experts for m in self.moes]

    @property
    def expert_memory_bytes(self):
        return sum(p.slots.nbytes for p in self.providers) + self.loader.nbytes

    def reset_cache(self):
        """Empty every layer's cache (slots keep stale weights, never read); an all-resident engine stays full."""
        if self.resident:
            return
        for p in self.providers:
            p.cache = ExpertCache(self.opts.cache, self.opts.policy)

    def preload_all(self):
        """Load every expert into a slot for good: the all-resident reference (cache == number of experts)."""
        if self.opts.cache != self.cfg.n_routed_experts:
            raise UserError(f"an all-resident engine needs --cache {self.cfg.n_routed_experts}, got {self.opts.cache}")
        for p in self.providers:
            accesses = [p.cache.access(e, use=False) for e in range(self.cfg.n_routed_experts)]
            self.loader.load_many(p.layer, [a for a in accesses if not a.hit], p.slots)
        self.synchronize()
        self.resident = True

    def compile_decode(self):
        """--compile: every expert in its slot for good, each layer's expert -> slot table a tensor (so a decode
        token never goes to the host), and the one-token step compiled with static shapes (a model.StaticKVCache)
        into fused kernels; on CUDA the compiled step is also recorded as a CUDA graph per cache size and
        replayed, one launch per token. Each cache size compiles once (tens of seconds; on the CPU a C++
        compiler is needed): the smallest (256 positions) here, a larger one on its first step; the prompt's
        prefill runs uncompiled."""
        self.preload_all()
        for p in self.providers:
            p.slot_of = torch.tensor([p.cache.slot_of[e] for e in range(self.cfg.n_routed_experts)], device=self.device)
        # the rope table of every position, made once: a recorded graph keeps reading the tensors it saw
        self.model.rope(torch.zeros(1, dtype=torch.long, device=self.device), self.cfg.max_position_embeddings)
        # cpp_wrapper (CPU): the step calls its many small kernels from C++, without Python's overhead per call
        options = {} if self.device.type == "cuda" else {"cpp_wrapper": True}
        self.compiled = torch.compile(self.model, fullgraph=True, dynamic=False, options=options)
        self.static_caches = {}  # positions -> (model.StaticKVCache, its CUDAGraphStep on CUDA)
        try:
            self.new_kv_cache(1)  # compile the smallest size now, so that no timed token pays for it
        except Exception as e:  # no C++ compiler, or something torch.compile cannot trace on this setup
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--compile failed ({first}); decode without --compile") from None
        return self.compiled

    def new_kv_cache(self, length):
        """A KV cache for `length` positions: a growing model.KVCache, or with --compile a fixed-size one,
        rounded up to a power of two (so a few compiled sizes serve every request) and kept for reuse."""
        if not self.opts.compile:
            return model.KVCache(length)  # all of it now: it never grows (and never copies) past its budget
        size = min(max(256, 1 << (length - 1).bit_length()), self.cfg.max_position_embeddings)
        if size not in self.static_caches:
            kv, token = model.StaticKVCache(size, self.device), torch.zeros(1, 1, dtype=torch.long, device=self.device)
            with torch.no_grad():
                kv.seek(0, 1)
                self.model(token, kv_cache=kv)  # uncompiled, as a prefill: allocates the cache's buffers
                kv.seek(1, 1)
                self.compiled(token, kv_cache=kv)  # compiles this size
                graph = CUDAGraphStep(self.compiled, kv) if self.device.type == "cuda" else None
            self.static_caches[size] = kv, graph
        kv, _ = self.static_caches[size]
        kv.length = 0  # what it holds is stale: the prefill overwrites it, `visible` hides the rest
        return kv

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
        if isinstance(kv, model.StaticKVCache):
            kv.seek(kv.length, ids.shape[1])  # outside the compiled step: this pass's positions
        if self.compiled is not None and ids.shape[1] == 1:
            graph = self.static_caches[kv.max_len][1]
            logits = graph(ids) if graph is not None else self.compiled(ids, kv_cache=kv)
            step.hits, step.misses = [self.cfg.num_experts_per_tok] * len(self.moes), [0] * len(self.moes)
            return logits
        return self.model(ids, kv_cache=kv)

    def _prefetch_next(self, layer, x):
        """After MoE layer `layer` computed on x (one decode token), load what the next MoE layer's
        gate picks for x: a guess (that layer sees a later hidden state), so it can load unused experts."""
        nxt = self.next_moe.get(layer)
        if nxt is None or x.shape[0] != 1:
            return
        nxt.experts.prefetch(needed_experts(nxt.gate(x, **nxt.experts.steer())[0].tolist()))

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
            hit_rate=dec.hit_rate, loads_per_token=dec.misses_per_token, mb_read_per_token=dec.mb_per_token,
            prefill_loads=pre.misses, prefill_mb=pre.bytes_read / 1e6,
            prefetch_loads=self.record.totals(first).prefetched, expert_memory_mb=self.expert_memory_bytes / 1e6,
            peak_rss_mb=peak_rss / 1e6 if peak_rss is not None else None, agreement=dec.agreement, kl=dec.kl,
            held_bytes=budget.held_bytes(self, kv), per_layer=self.record.per_layer([m.layer for m in self.moes], first + 1))
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
# Command line

def parse_args(argv=None):
    d = OffloadConfig()
    p = cli.ArgumentParser(description="Decode with routed experts on disk and an expert cache per MoE layer.")
    g = p.add_argument_group("model and prompt")
    g.add_argument("--model", default=None, help=f"checkpoint folder (default: {cli.DEFAULT_TUNED_DIR} if it "
                                                 f"exists, else {cli.DEFAULT_BASE_DIR})")
    g.add_argument("--prompt", default="def main():", help="text to continue (needs tokenizer.json in the folder)")
    g.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt "
                                                      "(for checkpoints without a tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy, which makes "
                                                                  "a small model repeat itself (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    g = p.add_argument_group("expert cache")
    g.add_argument("--cache", type=int, default=None, help=f"experts per MoE layer in memory (default: {d.cache})")
    g.add_argument("--budget", default=None, help="instead of --cache: memory for the engine (15MB, 6GB: 1000^n B; "
                   "512MiB: 1024^n B; auto: free GPU memory, or MemAvailable on the CPU): the largest cache that fits "
                   "after weights, KV cache, read buffers and a margin (" + budget.MARGIN_TEXT.replace("%", "%%") + ")")
    g.add_argument("--policy", choices=("lru", "lfu"), default=d.policy, help="eviction policy (default: %(default)s)")
    g.add_argument("--io", choices=("mmap", "direct"), default=d.io, help="mmap or O_DIRECT (default: %(default)s)")
    g.add_argument("--cache-bias", type=float, default=d.cache_bias,
                   help="bonus on cached experts' router scores before top-k (0 = plain routing)")
    g.add_argument("--cache-keep", type=int, default=d.cache_keep, metavar="J", help="guaranteed cache-aware "
                   "routing: keep each token's true top-J, fill the rest from cached experts within --cache-margin")
    g.add_argument("--cache-margin", type=float, default=d.cache_margin, help="with --cache-keep: how far below "
                   "the K-th best router score a cached expert may be (default: %(default)s, plain routing)")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.model = args.model or str(cli.default_model_dir())
    opts = OffloadConfig(cache=OffloadConfig.cache if args.cache is None else args.cache, policy=args.policy,
                         io=args.io, device=args.device, dtype=args.dtype, cache_bias=args.cache_bias,
                         cache_keep=args.cache_keep, cache_margin=args.cache_margin, prefetch=args.prefetch,
                         compile=args.compile, budget=args.budget)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with cli.user_errors(), cli.fatal_errors():  # Ctrl-C, a full disk, no memory: one line too
        # every check on user input comes before the (slow) load
        cfg = checkpoint.read_config(args.model)
        if args.budget is not None and (args.cache is not None or args.compile):
            raise UserError("--budget picks the cache: give --budget or --cache (--compile needs --cache), not both")
        check_cache_size(cfg, opts.cache if args.budget is None else 1)
        if args.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
        tok = checkpoint.load_tokenizer(args.model)
        prompt = cli.prompt_token_ids(args, tok, cfg.vocab_size)
        cli.check_prompt(len(prompt), args.max_new_tokens, cfg.max_position_embeddings)
        opts.positions, watch = len(prompt) + args.max_new_tokens, budget.MemoryWatch(cli.pick_device(args.device)[0])
        if args.compile and args.cache == cfg.n_routed_experts:  # (else the engine refuses, in one line)
            print("compiling the decode step (torch.compile: tens of seconds the first time)", file=sys.stderr)
        if args.json:  # before the generation, so that its figures are not lost at the last write
            cli.check_output(args.json, "--json", [args.model])
        engine = OffloadEngine(args.model, opts)
        dtype = str(engine.dtype).removeprefix("torch.")
        print(f"device: {engine.device} ({engine.device_reason}); dtype: {dtype} ({engine.dtype_reason}); "
              f"{torch.get_num_threads()} CPU threads", file=sys.stderr)
        if engine.store.fallback:
            print(f"note: {engine.store.fallback}", file=sys.stderr)
        if engine.split is not None:
            print(engine.split.describe(), file=sys.stderr)
        print(f"{args.model}: {cfg.model_type}, {len(cfg.moe_layers)} MoE layers x {cfg.n_routed_experts} experts "
              f"(top-{cfg.num_experts_per_tok}), cache {engine.opts.cache}/layer, {args.policy}, io {engine.store.io}; "
              + (f"temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}" if args.temperature
                 else "greedy"), file=sys.stderr)
        print(tok.decode(prompt) if tok is not None else " ".join(map(str, prompt)), end="", flush=True)
        gen = torch.Generator(device=engine.device).manual_seed(args.seed)
        _, r = engine.generate(prompt, args.max_new_tokens, args.temperature, args.top_p, gen, cli.TextStream(tok))
        engine.close()
        print()
        print(f"time to first token {r.ttft_s * 1e3:.1f} ms | {r.time_per_token_s * 1e3:.2f} ms/token | "
              f"{r.tokens_per_s:.1f} tokens/s")
        print(f"hit rate {r.hit_rate:.3f} | {r.loads_per_token:.2f} expert loads/token | "
              f"{r.mb_read_per_token:.3f} MB read/token | peak resident expert memory {r.expert_memory_mb:.2f} MB"
              + (f" | peak RSS {r.peak_rss_mb:.0f} MB" if r.peak_rss_mb is not None else "")
              + f" | agreement with the true top-k {r.agreement:.3f}, KL {r.kl:.4f}")
        print("decode steps per MoE layer: " + " | ".join(f"layer {c.layer} {c.hits} hits {c.misses} misses "
                                                          f"{c.bytes_read / 1e6:.3f} MB read" for c in r.per_layer))
        print(watch.describe(r.held_bytes, engine.split))
        if args.json:
            figures = dict(model=str(args.model), **asdict(engine.opts), **asdict(r))
            figures.update(device=str(engine.device), dtype=dtype, threads=torch.get_num_threads(),
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           memory=watch.figures(r.held_bytes), split=engine.split.figures() if engine.split else None)
            cli.write_json(args.json, figures)


if __name__ == "__main__":
    main()
