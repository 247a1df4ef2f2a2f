"""
budget.py: sizing the expert cache for a device. A memory budget (a size, or the memory free now) pays
first for what the engine holds whatever its cache: the resident weights (everything but the routed
experts), the KV cache for the requested length, the read buffers, and a margin; what is left buys expert
slots, the same number in every MoE layer: the largest number that fits. `plan` makes that choice and
returns the `Split`; `held_bytes` and `MemoryWatch` measure what the engine then really holds.

offload_infer.py --budget calls it. Sizes the cache as vLLM sizes its KV cache (what is fixed first, the
cache from what remains); leaves out activations (one sequence's are small: the margin covers them, the rope
table and the allocator's rounding) and any cache size that differs between layers.

Sizes: KB, MB, GB, TB are powers of 1000 (as disks are sold); KiB, MiB, GiB, TiB powers of 1024.
"""

import collections
import math
import mmap
import queue
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

import model
from cli import UserError
from store import expert_shapes

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
MARGIN_PARTS, MARGIN_FLOOR = 20, 2**20  # a twentieth (5%) of the budget, at least 1 MiB
MARGIN_TEXT = "5% of the budget, at least 1 MiB: activations, the rope table, the allocator's rounding"


def parse_size(text, flag="--budget"):
    """'15MB' -> (15000000, 'MB'); '512MiB' -> (536870912, 'MiB'); units are case-insensitive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", text, re.IGNORECASE)
    unit = {u.lower(): u for u in UNITS}.get(m.group(2).lower()) if m else None
    if unit is None:
        raise UserError(f"{flag} must be a size such as 15MB, 6GB or 512MiB (units: {', '.join(UNITS)}) "
                        f"or auto, got {text!r}")
    return round(float(m.group(1)) * UNITS[unit]), unit


def format_size(n, unit):
    v = n / UNITS[unit]
    return f"{v:.4g} {unit}" if abs(v) < 1000 else f"{v:,.0f} {unit}"


def free_memory(device):
    """--budget auto: (bytes free now, unit): on a GPU what the driver reports free, on the CPU MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "MB"
    free = proc_sizes("/proc/meminfo").get("MemAvailable")
    if free is None:
        raise UserError("--budget auto: cannot read MemAvailable from /proc/meminfo; give a size such as 6GB")
    return free, "MB"


def margin_bytes(budget):
    return max(-(-budget // MARGIN_PARTS), MARGIN_FLOOR)  # -(-a // b): a / b rounded up, in integers


# ----------------------------------------------------------------------------------------------
# What each part of the engine holds, from the config

def resident_bytes(cfg, dtype):
    """Every weight but the routed experts, as checkpoint.load_model holds them: parameters in the compute
    dtype (a tied head counted once), buffers (the fp32 score correction bias) in their own."""
    with torch.device("meta"):
        net = model.Transformer(cfg, experts_on_disk=True)
    return sum(p.numel() * dtype.itemsize for p in net.parameters()) + sum(b.nbytes for b in net.buffers())


def expert_bytes(cfg, dtype):
    """One routed expert's gate, up and down matrices in the compute dtype: one slot."""
    return sum(math.prod(s) for s in expert_shapes(cfg)) * dtype.itemsize


def kv_bytes_per_position(cfg, dtype):
    """What model.KVCache keeps per position, all layers: keys and values of every key/value head (GQA), or
    MLA's latent and its one rope key (kv_lora_rank + qk_rope_head_dim), the point of MLA."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.mla else 2 * cfg.num_key_value_heads * cfg.head_dim
    return cfg.num_hidden_layers * width * dtype.itemsize


def read_buffer_bytes(store, device, dtype, threads):
    """offload_infer.ExpertLoader's buffers with `threads` reads in flight: on CUDA a pinned host copy of an
    expert per read; with O_DIRECT an aligned buffer per reading thread (the engine's own thread too); with
    mmap the expert's file pages while it is copied (dropped after)."""
    staging = threads * expert_bytes(store.cfg, dtype) if device.type == "cuda" else 0
    return staging + ((threads + 1) * store.span if store.io == "direct" else threads * store.expert_bytes)


# ----------------------------------------------------------------------------------------------
# The split and the choice

@dataclass
class Split:
    """Where a budget goes, in bytes. The margin lies inside the budget: total <= budget."""
    budget: int
    unit: str          # the unit the budget came in; figures are printed in it
    layers: int        # MoE layers
    cache: int         # experts per MoE layer in slots: the choice
    expert: int        # one slot
    resident: int      # every weight but the routed experts
    positions: int     # the KV cache's length: prompt + new tokens
    kv: int
    read_buffers: int
    margin: int

    @property
    def slots(self):
        return self.layers * self.cache * self.expert

    @property
    def total(self):
        return self.resident + self.slots + self.kv + self.read_buffers + self.margin

    def figures(self):
        return dict(asdict(self), slots=self.slots, total=self.total, margin_rule=MARGIN_TEXT)

    def describe(self):
        f = (lambda n: format_size(n, self.unit))
        return (f"budget {f(self.budget)}: resident weights {f(self.resident)} + expert slots {self.layers} MoE "
                f"layers x {self.cache} x {f(self.expert)} = {f(self.slots)} + KV cache {self.positions} positions "
                f"{f(self.kv)} + read buffers {f(self.read_buffers)} + margin {f(self.margin)} "
                f"({MARGIN_TEXT}) = {f(self.total)} of {f(self.budget)}")


def plan(budget, cfg, store, device, dtype, positions, threads):
    """The Split of `budget` ("15MB", "512MiB" or "auto") with the largest cache per MoE layer that fits (at most
    every expert), or one UserError naming the smallest budget that holds one expert per layer."""
    size, unit = free_memory(device) if budget == "auto" else parse_size(budget)
    split = Split(budget=size, unit=unit, layers=len(cfg.moe_layers), cache=0, expert=expert_bytes(cfg, dtype),
                  resident=resident_bytes(cfg, dtype), positions=positions,
                  kv=positions * kv_bytes_per_position(cfg, dtype),
                  read_buffers=read_buffer_bytes(store, device, dtype, threads), margin=margin_bytes(size))
    cache = min(cfg.n_routed_experts, (size - split.total) // (split.layers * split.expert))
    if cache < 1:
        need = minimum_budget(replace(split, cache=1).total - split.margin)
        f = (lambda n: format_size(n, unit))
        shown = f"{need}B" if unit == "B" else f"{math.ceil(need / UNITS[unit] * 100) / 100:.2f}{unit}"
        raise UserError(f"--budget {budget} is too small: the resident weights ({f(split.resident)}), one expert per "
                        f"MoE layer ({split.layers} x {f(split.expert)}), the KV cache ({f(split.kv)}), "
                        f"the read buffers ({f(split.read_buffers)}) and the margin need at least {shown}")
    return replace(split, cache=cache)


def minimum_budget(held):
    """The smallest budget b with b - margin_bytes(b) >= held (b - margin grows with b: a bisection)."""
    lo, hi = held, 2 * held + MARGIN_FLOOR
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mid - margin_bytes(mid) >= held else (mid + 1, hi)
    return lo


# ----------------------------------------------------------------------------------------------
# Measured: what the engine holds, and what the process grew by

def held_bytes(*roots):
    """Bytes of every tensor storage reachable from `roots` (through containers, torch modules and the
    attributes of this repository's objects), each storage once (tied weights and views share one), plus
    anonymous memory maps (O_DIRECT read buffers). File-backed maps, the checkpoint's, are not counted:
    the tensors that view them are."""
    here = Path(__file__).resolve().parent
    seen, storages, total, todo = set(), set(), 0, list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if (s.device, s.data_ptr()) not in storages:
                storages.add((s.device, s.data_ptr()))
                total += s.nbytes()
        elif isinstance(obj, mmap.mmap):
            total += len(obj) if anonymous(obj) else 0
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            todo.extend(obj)
        elif isinstance(obj, queue.Queue):
            todo.extend(list(obj.queue))
        elif isinstance(obj, nn.Module) or Path(getattr(sys.modules.get(type(obj).__module__), "__file__", None)
                                                or "/").resolve().is_relative_to(here):
            todo.extend(vars(obj).values())
    return total


def anonymous(m):
    """Whether a memory map has no file behind it (size() asks the file)."""
    try:
        m.size()
        return False
    except OSError:
        return True


def proc_sizes(path):
    """The "Key: N kB" lines of a /proc file (meminfo, self/status) in bytes, or {} where there is none."""
    try:
        with open(path) as f:
            pairs = [line.split(":", 1) for line in f]
        return {k: int(v.split()[0]) * 1024 for k, v in pairs if v.strip().endswith("kB")}
    except OSError:
        return {}


class MemoryWatch:
    """The process's memory, measured: started before the model loads, read after decoding. Resident set
    growth (Linux), split into anonymous memory (tensors, Python objects, the allocator's free lists) and
    file pages (the checkpoint's weights where they stay memory-mapped, torch's code as each kernel is first
    used), with its peak; on CUDA torch's peak of allocated device memory (activations too)."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, device):
        self.device = torch.device(device)
        with torch.device("meta"):  # torch imports its meta kernels (with sympy: ~75 MB) on first use, as the
            nn.Embedding(1, 1)      # engine's model is built: before the baseline, so that growth is the engine's
        self.start = proc_sizes("/proc/self/status")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def figures(self, held):
        now, out = proc_sizes("/proc/self/status"), {"held_bytes": held}
        if all(k in now and k in self.start for k in self.KEYS + ("VmHWM",)):
            out.update({f"{k}_growth_bytes": now[k] - self.start[k] for k in self.KEYS})
            out["VmHWM_growth_bytes"] = now["VmHWM"] - self.start["VmRSS"]  # peak RSS since, over RSS at the start
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def describe(self, held, split=None):
        unit = split.unit if split is not None else "MB"
        x, f = self.figures(held), (lambda n: format_size(n, unit))
        text = (f"measured: tensors held {f(held)} (every tensor storage reachable from the engine and its KV cache, "
                f"once: weights, slots, KV cache, rope table, read buffers)")
        if split is not None:
            text += f", {'within' if held <= split.budget else 'OVER'} the budget {f(split.budget)}"
        if "VmRSS_growth_bytes" in x:
            text += (f" | process RSS grew {f(x['VmRSS_growth_bytes'])} since before loading (peak "
                     f"{f(x['VmHWM_growth_bytes'])}): anonymous {f(x['RssAnon_growth_bytes'])} (tensors, Python "
                     f"objects, free lists), file pages {f(x['RssFile_growth_bytes'])} (mapped weights, torch's code)")
        if "cuda_max_allocated_bytes" in x:
            text += f" | CUDA max allocated {f(x['cuda_max_allocated_bytes'])} (activations too)"
        return text
