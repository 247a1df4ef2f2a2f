"""Tests for store.py: every expert the store reads equals safetensors' own loader (mmap and O_DIRECT,
shards, bf16, FP8 dequantized), a read leaves nothing behind in this process's memory or the page
cache, O_DIRECT falls back where refused, reads from several threads at once lose nothing, and the
bandwidth CLI prints both I/O modes.
"""
import ctypes
import errno
import mmap
import os
import shutil

import pytest
import torch

import checkpoint
import cli
import store
from tiny import assert_cli_errors, make_checkpoint, read_config, read_tensors, write_checkpoint, write_fp8_checkpoint

PROJ_ON_DISK = {  # module name -> each architecture's tensor name, written out independently of checkpoint.RENAMES
    "mixtral": {"gate_proj": "block_sparse_moe.experts.{e}.w1", "up_proj": "block_sparse_moe.experts.{e}.w3",
                "down_proj": "block_sparse_moe.experts.{e}.w2"},
}


def expert_names(model_type, layer, e):
    table = PROJ_ON_DISK.get(model_type, {p: f"mlp.experts.{{e}}.{p}" for p in store.EXPERT_PROJS})
    return [f"model.layers.{layer}.{table[p].format(e=e)}.weight" for p in store.EXPERT_PROJS]


def safetensors_reference(path):
    """{name: tensor} with safetensors' own loader, over all shards."""
    return read_tensors(path)


@pytest.mark.parametrize("io", ["mmap", "direct"])
@pytest.mark.parametrize("vid", ["ds2-mla-greedy", "mixtral-gqa", "qwen2-sparse-step2"])
def test_store_matches_safetensors(vid, io, tiny):
    _, path = tiny(vid)
    ref = safetensors_reference(path)
    cfg = checkpoint.read_config(path)
    with store.ExpertStore(path, cfg, io) as st:
        assert st.io == io, st.fallback
        for layer in cfg.moe_layers:
            for e in range(cfg.n_routed_experts):
                got = st.read(layer, e)
                for t, name in zip(got, expert_names(cfg.model_type, layer, e)):
                    assert torch.equal(t, ref[name]), name
        assert st.reads == len(cfg.moe_layers) * cfg.n_routed_experts


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_store_reads_sharded_bf16_checkpoint(io, tmp_path):
    _, src = make_checkpoint(tmp_path / "f32", "qwen3_moe", max_shard_size="200KB")
    files = sorted(os.listdir(src))
    assert sum(f.endswith(".safetensors") for f in files) > 1, files
    tensors = {k: v.to(torch.bfloat16) for k, v in read_tensors(src).items()}
    write_checkpoint(tmp_path / "bf16", tensors, read_config(src))
    cfg = checkpoint.read_config(tmp_path / "bf16")
    for path, expect_dtype in ((src, torch.float32), (tmp_path / "bf16", torch.bfloat16)):
        ref = safetensors_reference(path)
        with store.ExpertStore(path, cfg, io) as st:
            for layer, e in [(cfg.moe_layers[0], 0), (cfg.moe_layers[-1], cfg.n_routed_experts - 1)]:
                for t, name in zip(st.read(layer, e), expert_names(cfg.model_type, layer, e)):
                    assert ref[name].dtype == expect_dtype
                    assert t.dtype == torch.float32 and torch.equal(t, ref[name].float()), name


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_store_dequantizes_fp8(io, tmp_path):
    _, src = make_checkpoint(tmp_path / "src", "deepseek_v3")
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "deq", block_size=(16, 16), with_mtp=False)
    cfg = checkpoint.read_config(tmp_path / "fp8")
    assert cfg.fp8_block == (16, 16)
    ref = safetensors_reference(tmp_path / "deq")  # dequantized by tiny.py's own loop
    with store.ExpertStore(tmp_path / "fp8", cfg, io) as st:
        assert st.parts[(cfg.moe_layers[0], 0)][0][0].dtype == torch.float8_e4m3fn
        for layer in cfg.moe_layers:
            for e in (0, 5, cfg.n_routed_experts - 1):
                for t, name in zip(st.read(layer, e), expert_names(cfg.model_type, layer, e)):
                    assert torch.equal(t, ref[name]), name


def _smaps_rss_kb(address):
    """Rss of the mapping that starts at `address`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-")[0] == f"{address:x}":
            for other in lines[i + 1:]:
                if other.startswith("Rss:"):
                    return int(other.split()[1])
    raise AssertionError("mapping not found")


def _page_cache_pages(path, start, end):
    """Pages of the file range [start, end) in the OS page cache, by mincore on a fresh mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    buf = (ctypes.c_char * len(m)).from_buffer(m)
    a = start - start % mmap.PAGESIZE
    n = -(-(end - a) // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * n)()
    rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf) + a), ctypes.c_size_t(end - a), vec)
    del buf
    m.close()
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_mmap_store_releases_pages(tiny, tmp_path):
    """After a read the expert occupies neither this process's memory nor the OS page cache."""
    _, src = tiny("ds2-mla-greedy")
    shutil.copytree(src, tmp_path / "ckpt")  # a file no other test has mapped
    path = tmp_path / "ckpt"
    fd = os.open(path / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped; the copy must reach the disk first
    os.close(fd)
    cfg = checkpoint.read_config(path)
    with store.ExpertStore(path, cfg, "mmap") as st:
        m = st.maps[path / "model.safetensors"]
        buf = (ctypes.c_char * len(m)).from_buffer(m)
        address = ctypes.addressof(buf)
        del buf
        for layer, e in st.parts:
            st.read(layer, e)
        assert _smaps_rss_kb(address) == 0
        infos = [i for parts in st.parts.values() for i, _ in parts]
        lo, hi = min(i.start for i in infos), max(i.end for i in infos)
        assert _page_cache_pages(path / "model.safetensors", lo, hi) <= 2  # at most the edge pages' neighbours


def test_direct_falls_back_when_refused(tiny, monkeypatch):
    _, path = tiny("ds2-mla-greedy")

    def refuse(path):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(store, "open_direct", refuse)
    ref = safetensors_reference(path)
    cfg = checkpoint.read_config(path)
    with store.ExpertStore(path, cfg, "direct") as st:
        assert st.io == "mmap" and "refuses O_DIRECT" in st.fallback
        for t, name in zip(st.read(1, 3), expert_names(cfg.model_type, 1, 3)):
            assert torch.equal(t, ref[name])


def test_store_rejects_checkpoint_without_experts(tiny, tmp_path):
    _, src = tiny("ds2-mla-greedy")
    tensors = read_tensors(src)
    dense = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    write_checkpoint(tmp_path / "noexp", dense, read_config(src))
    with pytest.raises(cli.UserError, match="no routed expert tensors") as e:
        store.ExpertStore(tmp_path / "noexp")
    assert "\n" not in str(e.value)
    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    write_checkpoint(tmp_path / "one-missing", missing, read_config(src))
    with pytest.raises(cli.UserError, match="experts.5.up_proj"):
        store.ExpertStore(tmp_path / "one-missing")


def test_read_bandwidth_counts_bytes(tiny):
    _, path = tiny("ds2-mla-greedy")
    with store.ExpertStore(path, io="mmap") as st:
        experts = list(st.parts)[:4]
        assert store.read_bandwidth(st, experts) > 0
        assert st.bytes_read == 5 * st.expert_bytes  # one scratch read + four timed reads


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_reads_from_several_threads_at_once(io, tiny):
    """The engine reads a token's misses in parallel threads: every expert of every layer, read 4 at a time
    into distinct outputs, equals safetensors' tensors, and the counts add up (no update lost to a race)."""
    from concurrent.futures import ThreadPoolExecutor
    _, path = tiny("ds2-mla-greedy")
    ref = safetensors_reference(path)
    cfg = checkpoint.read_config(path)
    with store.ExpertStore(path, cfg, io) as st, ThreadPoolExecutor(4) as pool:
        experts = list(st.parts)
        outs = {key: st.read(*key) for key in experts}  # scratch triples, filled with the right expert already
        for t in [x for triple in outs.values() for x in triple]:
            t.zero_()
        before, reads = st.bytes_read, st.reads
        for done in [pool.submit(st.read_into, *key, outs[key]) for key in experts]:
            done.result()
        for (layer, e), triple in outs.items():
            for got, name in zip(triple, expert_names(cfg.model_type, layer, e)):
                assert torch.equal(got, ref[name]), name
        assert st.reads - reads == len(experts)
        if io == "mmap":  # O_DIRECT counts whole aligned blocks
            assert st.bytes_read - before == len(experts) * st.expert_bytes
        assert store.read_bandwidth(st, experts[:8], in_flight=4) > 0


def test_expert_shapes_are_checked(tiny, tmp_path):
    """store.expert_shapes is the one statement of an expert's matrices: gate (F, D), up (F, D), down (D, F),
    the shapes of the checkpoint's tensors; a tensor of another shape is refused with the name and both shapes."""
    _, src = tiny("ds2-mla-greedy")
    cfg = checkpoint.read_config(src)
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    assert store.expert_shapes(cfg) == ((F, D), (F, D), (D, F))
    tensors = read_tensors(src)
    assert [tuple(tensors[n].shape) for n in expert_names(cfg.model_type, 1, 0)] == list(store.expert_shapes(cfg))
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    write_checkpoint(tmp_path / "bad", tensors, read_config(src))
    with pytest.raises(cli.UserError, match=rf"{name}.*shape \[{D}, {F - 1}\], config implies \[{D}, {F}\]"):
        store.ExpertStore(tmp_path / "bad")


def test_cli_prints_bandwidth_of_both_modes(tiny, capsys):
    _, path = tiny("ds2-mla-greedy")
    store.main(["--model", str(path), "--in-flight", "1", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [(line.split(":")[0].strip(), line.split(", ")[-1]) for line in lines] == [
        ("mmap", "1 in flight"), ("mmap", "2 in flight"), ("direct", "1 in flight"), ("direct", "2 in flight")]
    assert all(float(line.split(":")[1].split()[0]) > 0 for line in lines)  # MB/s


def test_cli_bad_input_is_one_line(tiny, tmp_path):
    _, path = tiny("ds2-mla-greedy")
    cases = {"in flight 0": (["--model", str(path), "--in-flight", "0"], "--in-flight and --repeats must be >= 1"),
             "no model": (["--model", str(tmp_path / "nope")], "does not exist")}
    assert_cli_errors(store.__file__, cases, cwd=tmp_path)
