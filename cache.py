"""
cache.py: expert caches for offloaded MoE decoding: which experts stay in fast memory, how many
requests a routing trace would miss, and how a missing expert is read from disk.

What it teaches: a device that holds only `capacity` routed experts per MoE layer must read every
other expert a token selects from storage. How often that happens depends on three things that
this file keeps apart: the routing (what ReMoE trains), the eviction policy (LRU, LFU, or Belady's
offline optimum, the bound no policy can beat), and the rules of the simulation. Published hit
rates disagree by more than ten points because simulators hide those rules, so here each one is an
option of `SimOptions` with a stated default:
  - scope "layer" (default): every MoE layer has `capacity` slots of its own; "global": one pool
    of capacity x L slots shared by all layers (same memory, experts compete across layers);
  - cold start (default, warmup_steps=0): the cache is empty at the start of every sequence and
    every request counts; warm (warmup_steps=N): the first N steps fill the cache uncounted;
  - together (default True): a token's K experts are needed at the same time, so when they fit
    (capacity >= K) none of them is evicted to make room for another, and hits are decided for
    the whole top-k before recency changes; when they do not fit they stream through the cache
    one at a time. together=False makes every access an independent lookup.
The decode engine (offload_infer.py) drives the same `ExpertCache`, so its counts equal the
simulator's under the defaults, and the tests check both against a brute-force simulation.

A *step* is one forward pass: one token while decoding, or a whole prompt in a batched prefill.
A step needs the distinct experts its tokens chose, in order of first appearance (for one token:
its top-k in slot order).

The disk store reads one expert's three matrices by name, at the byte offsets in the safetensors
header, either through a memory map (default, as llama.cpp does) or with O_DIRECT reads that
bypass the page cache. Either way the memory budget stays honest: after an expert is copied into
a cache slot its file pages are dropped from this process (madvise) and from the page cache
(posix_fadvise), so a later miss is a real read and not a hidden memory copy.

Leaves out: prefetching and speculation in the simulator (the engine has an opt-in prefetch),
variable-size experts, compression, and any cache below whole experts (no per-row or per-bit
caching). Follows: Belady, "A study of replacement algorithms for a virtual-storage computer"
(IBM Systems Journal, 1966) for MIN; Eliseev & Mazur, "Fast inference of Mixture-of-Experts
language models with offloading" (2023) for the per-layer LRU expert cache.

    python cache.py --model runs/default/base                          # LRU/LFU/Belady hit rates on a text (CPU)
    python cache.py --model runs/default/base --capacity 4 8 16 --scope global --warmup-steps 16
    python cache.py --model runs/default/base --read-bench               # mmap vs O_DIRECT expert reads

Shapes: T tokens, E routed experts, K top-k, D hidden, F expert width, L MoE layers, S steps.
"""

import math
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoint
import cli

POLICIES = ("lru", "lfu", "belady")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # module names; disk names come from checkpoint.disk_name
DIRECT_ALIGN = 4096  # O_DIRECT needs offset, length and buffer aligned to the logical block size (<= 4096)
RELEASE_ALIGN = 2 << 20  # the largest folio a fault maps with 4 KiB pages (one PMD); fault-around stays inside it


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
    scope: str = "layer"      # "layer": `capacity` slots per MoE layer; "global": capacity x L shared by all layers
    warmup_steps: int = 0     # 0: cold start; N > 0: warm, the first N steps of each sequence fill the cache uncounted
    together: bool = True     # a token's K experts are needed together (see the file docstring)

    def __post_init__(self):
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class SimResult:
    """Counts of the counted steps of every sequence, one row per step."""
    hits: torch.Tensor    # (S, L) requests found in the cache, per step and MoE layer
    misses: torch.Tensor  # (S, L) requests read from storage
    tokens: torch.Tensor  # (S,) tokens in each step (1 while decoding, the prompt length for a prefill)

    @property
    def hit_rate(self):
        total = (self.hits + self.misses).sum().item()
        return self.hits.sum().item() / total if total else float("nan")

    @property
    def misses_per_token(self):
        """Experts loaded per token, all MoE layers together: what sets the bytes read per token."""
        n = self.tokens.sum().item()
        return self.misses.sum().item() / n if n else float("nan")

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


def sweep(traces, capacities, policies=POLICIES, options=None):
    """{(policy, capacity): SimResult} for every combination: the table a hit-rate study reports."""
    return {(p, c): simulate(traces, p, c, options) for p in policies for c in capacities}


# ----------------------------------------------------------------------------------------------
# Disk store: one expert's three matrices, read from the safetensors files at the byte offsets of
# the header, into a cache slot (or a pinned host buffer on CUDA), converted to the slot's dtype.

class ExpertStore:
    """Reads routed experts from a checkpoint folder by name. io="mmap" copies from a memory map
    (readahead limited to the expert, pages dropped after the copy); io="direct" reads with O_DIRECT
    into an aligned buffer, bypassing the page cache. Where O_DIRECT is refused (e.g. tmpfs on older
    kernels, or no O_DIRECT on this OS), the store falls back to mmap and says why in `fallback`."""

    def __init__(self, path, cfg=None, io="mmap"):
        if io not in ("mmap", "direct"):
            raise ValueError(f"io must be 'mmap' or 'direct', got {io!r}")
        self.path = Path(path)
        self.cfg = cfg or checkpoint.read_config(self.path)
        self.parts = self._index(checkpoint.checkpoint_tensors(self.path))
        self.files = sorted({i.file for parts in self.parts.values() for pair in parts for i in pair if i is not None})
        first = self.parts[next(iter(self.parts))]
        self.expert_bytes = sum(i.end - i.start for pair in first for i in pair if i is not None)  # on disk
        self.bytes_read = 0  # bytes moved from the files (O_DIRECT: whole aligned blocks; mmap: the tensors)
        self.reads = 0       # experts read
        self.io, self.fallback = io, None
        self.fds = {f: os.open(f, os.O_RDONLY) for f in self.files}  # for posix_fadvise (and mmap)
        self.sizes = {f: os.fstat(fd).st_size for f, fd in self.fds.items()}
        self.maps, self.direct_fds = {}, {}
        self.span, self.buffers = 0, {}  # O_DIRECT: an aligned buffer of `span` bytes per reading thread
        self.lock = threading.Lock()     # reads may run in several threads (the engine reads a token's misses so)
        if io == "direct":
            self._open_direct()
        if self.io == "mmap":
            for f, fd in self.fds.items():
                # private mapping so torch.frombuffer gets a writable buffer; nothing is ever written
                self.maps[f] = m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                if hasattr(m, "madvise"):  # no speculative readahead into neighbouring experts
                    m.madvise(mmap.MADV_RANDOM)

    def _index(self, infos):
        """(layer, expert) -> [(weight TensorInfo, FP8 scale TensorInfo or None)] in EXPERT_PROJS order,
        each checked against the config, so a bad checkpoint fails here and not mid-decode."""
        cfg = self.cfg
        if not cfg.moe_layers or not any(checkpoint.is_routed_expert(name) for name in infos):
            example = self._name(cfg.moe_layers[0] if cfg.moe_layers else 0, 0, "gate_proj")
            raise cli.UserError(f"{self.path}: no routed expert tensors in the checkpoint "
                                        f"(expected names like {example!r})")
        D, Fw = cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": (Fw, D), "up_proj": (Fw, D), "down_proj": (D, Fw)}
        index = {}
        for layer in cfg.moe_layers:
            for e in range(cfg.n_routed_experts):
                parts = []
                for proj in EXPERT_PROJS:
                    name = self._name(layer, e, proj)
                    info = infos.get(name)
                    if info is None:
                        raise cli.UserError(f"{self.path}: missing routed expert tensor {name!r}")
                    if info.shape != shapes[proj]:
                        raise cli.UserError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                                    f"config implies {list(shapes[proj])}")
                    scale = infos.get(name + "_scale_inv") if info.dtype in FP8_DTYPES else None
                    if info.dtype in FP8_DTYPES and scale is None:
                        raise cli.UserError(f"{info.file}: FP8 tensor {name!r} has no "
                                                    f"{name + '_scale_inv'!r}")
                    parts.append((info, scale))
                index[(layer, e)] = parts
        return index

    def _name(self, layer, expert, proj):
        return checkpoint.disk_name(self.cfg, f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight")

    def _open_direct(self):
        reason = None
        if not hasattr(os, "O_DIRECT"):
            reason = "this OS has no O_DIRECT"
        else:
            try:
                for f in self.files:
                    self.direct_fds[f] = open_direct(f)
            except OSError as e:
                reason = f"{f} refuses O_DIRECT ({e.strerror or e}; tmpfs on older kernels does)"
        if reason is not None:
            for fd in self.direct_fds.values():
                os.close(fd)
            self.direct_fds, self.io = {}, "mmap"
            self.fallback = f"--io direct unavailable: {reason}; reading through mmap, pages dropped after each read"
            return
        # each reading thread's buffer holds the largest tensor's aligned span
        spans = [b - a for parts in self.parts.values() for pair in parts for i in pair if i is not None
                 for a, b in [self._aligned(i)]]
        self.span = max(spans)

    @staticmethod
    def _aligned(info):
        return info.start - info.start % DIRECT_ALIGN, -(-info.end // DIRECT_ALIGN) * DIRECT_ALIGN

    def _buffer(self):
        """This thread's O_DIRECT buffer (anonymous maps are page aligned, as O_DIRECT needs)."""
        buf = self.buffers.get(threading.get_ident())
        if buf is None:
            with self.lock:
                buf = self.buffers[threading.get_ident()] = mmap.mmap(-1, self.span)
        return buf

    def _count(self, nbytes, experts=0):
        with self.lock:
            self.bytes_read += nbytes
            self.reads += experts

    def _view(self, info):
        """The tensor's bytes on disk as a tensor, valid until this thread's next _view (O_DIRECT reuses its buffer)."""
        count = math.prod(info.shape)
        if self.io == "direct":
            a, b = self._aligned(info)
            buf = self._buffer()
            n = os.preadv(self.direct_fds[info.file], [memoryview(buf)[: b - a]], a)
            if n < info.end - a:
                raise cli.UserError(f"{info.file}: short read at byte {a} ({n} bytes)")
            self._count(n)
            t = torch.frombuffer(buf, dtype=info.dtype, count=count, offset=info.start - a)
        else:
            m = self.maps[info.file]
            a = info.start - info.start % mmap.PAGESIZE
            if hasattr(m, "madvise"):  # one readahead of exactly this tensor instead of a fault per page
                m.madvise(mmap.MADV_WILLNEED, a, info.end - a)
            self._count(info.end - info.start)
            t = torch.frombuffer(m, dtype=info.dtype, count=count, offset=info.start)
        return t.view(info.shape)

    def _release(self, info):
        """Drop the tensor's pages from this process (madvise) and from the OS page cache (fadvise):
        the slot holds the copy, so the file's pages would only hide the next miss's true cost.
        A page fault maps more than it asked for (fault-around, whole large folios), so the range
        dropped is widened to RELEASE_ALIGN; nothing else reads this mapping, so that is harmless."""
        a = info.start - info.start % RELEASE_ALIGN
        b = min(-(-info.end // RELEASE_ALIGN) * RELEASE_ALIGN, self.sizes[info.file])
        if self.io != "mmap":
            return  # O_DIRECT never filled the page cache, and its buffer is reused
        if hasattr(self.maps[info.file], "madvise"):
            self.maps[info.file].madvise(mmap.MADV_DONTNEED, a, b - a)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fds[info.file], a, b - a, os.POSIX_FADV_DONTNEED)

    def read_into(self, layer, expert, out):
        """Copy expert `expert` of MoE layer `layer` into `out` = (gate (F, D), up (F, D), down (D, F)),
        converting to their dtype: FP8 is dequantized with its block scales, bf16 becomes float32 on CPU.
        Safe to call from several threads at once (each has its own O_DIRECT buffer)."""
        for (info, scale), dst in zip(self.parts[(layer, expert)], out):
            if scale is not None:
                s = self._view(scale).clone()  # read first: the weight's read may reuse the buffer
                self._release(scale)
                dst.copy_(checkpoint.dequantize_fp8(self._view(info), s, self.cfg.fp8_block))
            else:
                dst.copy_(self._view(info))
            self._release(info)
        self._count(0, experts=1)

    def read(self, layer, expert, dtype=torch.float32):
        """A fresh (gate, up, down) triple of `dtype` tensors: for tests and tools."""
        D, Fw = self.cfg.hidden_size, self.cfg.moe_intermediate_size
        out = (torch.empty(Fw, D, dtype=dtype), torch.empty(Fw, D, dtype=dtype), torch.empty(D, Fw, dtype=dtype))
        self.read_into(layer, expert, out)
        return out

    def drop_page_cache(self):
        """Evict every expert's bytes from the OS page cache, so the first read of each is a real read."""
        if hasattr(os, "posix_fadvise"):
            for parts in self.parts.values():
                for info, scale in parts:
                    for i in (info, scale):
                        if i is not None:
                            os.posix_fadvise(self.fds[i.file], i.start, i.end - i.start, os.POSIX_FADV_DONTNEED)

    def close(self):
        for m in self.maps.values():
            m.close()
        for buf in self.buffers.values():
            buf.close()
        for fd in list(self.fds.values()) + list(self.direct_fds.values()):
            os.close(fd)
        self.maps, self.fds, self.direct_fds, self.buffers = {}, {}, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_direct(path):
    """An O_DIRECT descriptor, after one aligned test read: some filesystems accept the flag at open
    and refuse the read."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    probe = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        os.preadv(fd, [probe], 0)
    except OSError:
        os.close(fd)
        raise
    finally:
        probe.close()
    return fd


def read_bandwidth(store, experts, seed=0, in_flight=1):
    """Bytes per second of reading `experts` [(layer, expert)] with `store`, `in_flight` at a time (in
    threads), in a random order (a miss is a random read, not a sequential sweep), from a dropped page
    cache: the reads a miss makes."""
    outs = [store.read(*experts[0]) for _ in range(in_flight)]  # scratch triples (also warm the code path)
    order = torch.randperm(len(experts), generator=torch.Generator().manual_seed(seed)).tolist()
    store.drop_page_cache()
    before, t0 = store.bytes_read, time.perf_counter()
    if in_flight == 1:
        for i in order:
            store.read_into(*experts[i], outs[0])
    else:
        with ThreadPoolExecutor(in_flight) as pool:
            for start in range(0, len(order), in_flight):
                batch = order[start:start + in_flight]
                for done in [pool.submit(store.read_into, *experts[i], out) for i, out in zip(batch, outs)]:
                    done.result()
    return (store.bytes_read - before) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Command line: hit rates of every policy on a text's routing, or the store's read bandwidth

def main(argv=None):
    p = cli.ArgumentParser(description="Replay a model's routing of a text through expert caches, "
                                            "or measure how fast experts are read from disk.")
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
    p.add_argument("--read-bench", action="store_true", help="measure mmap and O_DIRECT read bandwidth instead")
    args = p.parse_args(argv)
    path = Path(args.model or cli.default_model_dir())
    with cli.user_errors():
        if any(c < 1 for c in args.capacity):
            raise cli.UserError(f"--capacity values must be >= 1, got {args.capacity}")
        cfg = checkpoint.read_config(path)
        if args.read_bench:
            for io in ("mmap", "direct"):
                with ExpertStore(path, cfg, io) as store:
                    if store.fallback:
                        print(f"note: {store.fallback}", file=sys.stderr)
                    experts = list(store.parts)
                    bw = read_bandwidth(store, experts)
                    print(f"{io:6s}: {bw / 1e6:8.1f} MB/s over {len(experts)} experts of "
                          f"{store.expert_bytes / 1e6:.3f} MB, random order")
            return
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
