"""
store.py: the disk-backed expert store: one routed expert's three matrices read from the safetensors
files by name, at the byte offsets of the header, into a cache slot, converted to the slot's dtype.

What it teaches: a miss is a read, and the memory budget must stay honest. Reads go through a memory
map (default, as llama.cpp does) or with O_DIRECT, bypassing the page cache; after a copy the
expert's file pages are dropped from this process (madvise) and from the page cache (posix_fadvise),
so the next miss is a real read and not a hidden copy in memory. The CLI measures the read bandwidth
that a miss sees: single experts in random order, from a dropped page cache.

Leaves out: compression, reads smaller than a whole expert, and asynchronous I/O (io_uring): the
engine (offload_infer.py) overlaps reads with threads instead.

    python store.py --model runs/default/base                   # mmap vs O_DIRECT read bandwidth (CPU)
    python store.py --model runs/default/base --in-flight 1 4   # also with 4 reads in flight
"""

import math
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import checkpoint
import cli

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # module names; disk names come from checkpoint.disk_name
DIRECT_ALIGN = 4096  # O_DIRECT needs offset, length and buffer aligned to the logical block size (<= 4096)
RELEASE_ALIGN = 2 << 20  # the largest folio a fault maps with 4 KiB pages (one PMD); fault-around stays inside it


def expert_shapes(cfg):
    """One routed expert's matrices in EXPERT_PROJS order: gate (F, D), up (F, D), down (D, F)."""
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    return (F, D), (F, D), (D, F)


# ----------------------------------------------------------------------------------------------
# The store

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
        self.shapes = expert_shapes(self.cfg)  # gate (F, D), up (F, D), down (D, F)
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
        shapes = dict(zip(EXPERT_PROJS, self.shapes))
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
                    checkpoint.check_float(info, name)
                    scale = infos.get(name + "_scale_inv") if info.dtype in FP8_DTYPES else None
                    if info.dtype in FP8_DTYPES and scale is None:
                        raise cli.UserError(f"{info.file}: FP8 tensor {name!r} has no {name + '_scale_inv'!r}")
                    if scale is not None:
                        checkpoint.check_float(scale, name + "_scale_inv")
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
        Safe to call from several threads at once (each has its own O_DIRECT buffer). An expert with a
        NaN or Inf weight is refused here, when it is read: scanning every expert at load would read the
        whole disk and defeat offloading."""
        for (info, scale), dst, proj in zip(self.parts[(layer, expert)], out, EXPERT_PROJS):
            if scale is not None:
                s = self._view(scale).clone()  # read first: the weight's read may reuse the buffer
                self._release(scale)
                dst.copy_(checkpoint.dequantize_fp8(self._view(info), s, self.cfg.fp8_block))
            else:
                dst.copy_(self._view(info))
            self._release(info)
            checkpoint.check_finite(dst, info, self._name(layer, expert, proj))
        self._count(0, experts=1)

    def read(self, layer, expert, dtype=torch.float32):
        """A fresh (gate, up, down) triple of `dtype` tensors: for tests and tools."""
        out = tuple(torch.empty(shape, dtype=dtype) for shape in self.shapes)
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
# Command line: how fast a miss is read

def main(argv=None):
    p = cli.ArgumentParser(description="Measure how fast routed experts are read from a checkpoint's files: "
                                       "single experts in random order from a dropped page cache, through mmap "
                                       "and with O_DIRECT.")
    p.add_argument("--model", default=None, help=f"checkpoint folder (default: {cli.DEFAULT_TUNED_DIR} if it "
                                                 f"exists, else {cli.DEFAULT_BASE_DIR})")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1],
                   help="reads issued at once, in threads (default: %(default)s; the engine issues up to 4)")
    p.add_argument("--repeats", type=int, default=3, help="passes over every expert, the fastest kept "
                                                          "(default: %(default)s)")
    args = p.parse_args(argv)
    path = Path(args.model or cli.default_model_dir())
    with cli.user_errors():
        if min(args.in_flight) < 1 or args.repeats < 1:
            raise cli.UserError(f"--in-flight and --repeats must be >= 1, got {args.in_flight} and {args.repeats}")
        cfg = checkpoint.read_config(path)
        for io in ("mmap", "direct"):
            with ExpertStore(path, cfg, io) as store:
                if store.fallback:
                    print(f"note: {store.fallback}", file=sys.stderr)
                experts = list(store.parts)
                for n in args.in_flight:
                    bw = max(read_bandwidth(store, experts, seed, n) for seed in range(args.repeats))
                    print(f"{io:6s}: {bw / 1e6:8.1f} MB/s over {len(experts)} experts of "
                          f"{store.expert_bytes / 1e6:.3f} MB, random order, {n} in flight")


if __name__ == "__main__":
    main()
