"""Tests for budget.py and offload_infer.py --budget: the split's parts against what a loaded engine really
holds (the checkpoint's non-expert tensors, slots, a KV cache actually filled), the choice (the largest cache
that fits: one more expert would not), the minimum named by the error (it fits, a byte less does not), the
--json record and the measured held bytes within the budget; and the per-layer counts of an offloaded run
(they sum to the totals and equal cache.py's simulator replaying the same routing, bytes = misses x expert).
"""
import json
import mmap
import re
from dataclasses import replace

import pytest
import torch

import budget
import cache
import checkpoint
import model
import offload_infer as oi
from cli import UserError
from store import ExpertStore
from tiny import assert_cli_errors, random_ids, read_tensors

MAIN = "ds2-mla-greedy"  # MLA: 8 experts, top-3, layer 0 dense then 2 MoE layers
F32 = torch.float32


@pytest.mark.parametrize("text, want", [("15MB", (15_000_000, "MB")), ("512MiB", (512 * 2**20, "MiB")),
                                        ("1.5GB", (1_500_000_000, "GB")), ("6 gb", (6 * 10**9, "GB")),
                                        ("2kib", (2048, "KiB")), ("100B", (100, "B")), (".5KB", (500, "KB"))])
def test_parse_size(text, want):
    assert budget.parse_size(text) == want


@pytest.mark.parametrize("text", ["15", "MB", "-1MB", "1e3MB", "15XB", "15 M B", ""])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="--budget must be a size such as 15MB"):
        budget.parse_size(text)


@pytest.mark.parametrize("vid", [MAIN, "qwen3-gqa-headdim", "mixtral-gqa"])
def test_split_parts_equal_what_the_engine_holds(vid, tiny, loaded):
    """Resident weights = the checkpoint's tensors but the routed experts (float32 on disk and in memory) =
    the loaded engine's parameters and buffers; slots = cache x one expert per layer; KV bytes per position x
    length = the buffers of a model.KVCache filled by a forward pass over that many tokens."""
    _, path = tiny(vid)
    cfg = checkpoint.read_config(path)
    on_disk = sum(t.nbytes for name, t in read_tensors(path).items() if not checkpoint.is_routed_expert(name))
    assert budget.resident_bytes(cfg, F32) == on_disk
    assert budget.resident_bytes(cfg, torch.bfloat16) < on_disk  # parameters shrink with the dtype
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=3))
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*engine.model.parameters(), *engine.model.buffers()]}
    assert sum(held.values()) == on_disk
    assert all(p.slots.nbytes == 3 * budget.expert_bytes(cfg, F32) for p in engine.providers)
    engine.close()
    n = 11
    kv = model.KVCache(n)
    with torch.no_grad():
        loaded(vid)(random_ids(cfg.vocab_size, 1, n), kv_cache=kv)
    assert sum(t.nbytes for bufs in kv.buffers.values() for t in bufs) == n * budget.kv_bytes_per_position(cfg, F32)
    if cfg.mla:  # the latent and one rope key, far less than every head's keys and values
        assert budget.kv_bytes_per_position(cfg, F32) < (
            cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.attn_head_dim * 4)


def test_read_buffers_bound_the_loaders(tiny):
    """O_DIRECT: each reading thread's aligned buffer is the store's span, and the split counts one per
    read in flight plus the engine's own thread; mmap holds no buffer after a read."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    for io in ("direct", "mmap"):
        engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=1, io=io))
        engine.generate(random_ids(cfg.vocab_size, 1, 6)[0].tolist(), 6)
        split = budget.read_buffer_bytes(engine.store, engine.device, F32, oi.ExpertLoader.READ_THREADS)
        if engine.store.io == "direct":
            assert engine.store.buffers and all(len(b) == engine.store.span for b in engine.store.buffers.values())
            assert 0 < engine.loader.nbytes <= split == (oi.ExpertLoader.READ_THREADS + 1) * engine.store.span
        else:
            assert engine.loader.nbytes == 0 and split == oi.ExpertLoader.READ_THREADS * engine.store.expert_bytes
        engine.close()


def plan(path, size, positions=12):
    cfg = checkpoint.read_config(path)
    with ExpertStore(path, cfg) as store:
        return budget.plan(size, cfg, store, torch.device("cpu"), F32, positions, oi.ExpertLoader.READ_THREADS)


def test_choice_is_the_largest_cache_that_fits(tiny):
    """From the minimum up to beyond every expert: the split fits, and one more expert per layer would not
    (unless every expert is cached); the minimum fits one expert, a byte less raises."""
    _, path = tiny(MAIN)
    E = checkpoint.read_config(path).n_routed_experts
    low = plan(path, "10GB")
    assert low.cache == E
    minimum = budget.minimum_budget(replace(low, cache=1).total - low.margin)
    assert plan(path, f"{minimum}B").cache == 1
    with pytest.raises(UserError, match="too small"):
        plan(path, f"{minimum - 1}B")
    seen = set()
    for size in range(minimum, minimum + (E + 1) * low.layers * low.expert, 2999):
        split = plan(path, f"{size}B")
        assert split.budget == size and split.total <= size and split.margin == budget.margin_bytes(size)
        assert split.cache == E or replace(split, cache=split.cache + 1).total > size, size
        seen.add(split.cache)
    assert seen == set(range(1, E + 1))


@pytest.mark.parametrize("given", ["0.5MB", "700KiB", "12B"])
def test_minimum_is_named_in_the_given_unit_and_fits(given, tiny):
    _, path = tiny(MAIN)
    with pytest.raises(UserError) as e:
        plan(path, given)
    unit = budget.parse_size(given)[1]
    named = re.search(r"need at least (\S+)$", str(e.value)).group(1)
    assert budget.parse_size(named)[1] == unit
    assert plan(path, named).cache == 1  # rounded up: the named budget works


def test_held_bytes_counts_each_storage_once(tmp_path):
    """Worked by hand: a 100-float tensor and a view of it (400 B once), a module and its own weight (2 x 3
    floats: 24 B once), a deque of an 8-byte tensor, an anonymous 4096-B map; a file map and a tensor that
    only a function makes do not count."""
    class Holder:  # defined in this repository: its attributes are walked
        pass
    f = tmp_path / "x.bin"
    f.write_bytes(b"0" * 8192)
    h = Holder()
    t = torch.zeros(100)
    lin = torch.nn.Linear(3, 2, bias=False)
    h.items = {"a": t, "b": [t[10:20], (lin, lin.weight)]}
    h.queue = __import__("collections").deque([torch.zeros(2)])
    with f.open("rb") as fd:
        h.anon, h.file = mmap.mmap(-1, 4096), mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
    h.hidden = lambda: torch.zeros(1000)
    assert budget.held_bytes(h) == 400 + 24 + 8 + 4096
    assert budget.held_bytes(h, h.items) == budget.held_bytes(h)


def test_margin_is_a_twentieth_with_a_floor():
    assert budget.margin_bytes(10**9) == 5 * 10**7 and budget.margin_bytes(10**6) == 2**20


def test_cli_budget_picks_the_cache_and_stays_within_it(tiny, tmp_path, capsys):
    """--budget between the minimum and the all-experts split: fewer than E experts, the split printed and in
    --json with the chosen cache, and the tensors the engine holds after decoding (measured by walking it)
    at least what the split counts but transient read buffers, at most that plus the margin, within the budget."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    prompt, new = random_ids(cfg.vocab_size, 1, 5, seed=2)[0].tolist(), 7
    full = plan(path, "10GB", len(prompt) + new)
    size = full.total - full.margin + 2**20 - 3 * full.layers * full.expert  # room for E - 3 experts per layer
    out = tmp_path / "b.json"
    oi.main(["--model", str(path), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new),
             "--budget", f"{size / 1e6}MB", "--json", str(out), "--temperature", "0"])
    printed = capsys.readouterr()
    r = json.loads(out.read_text())
    split = r["split"]
    assert r["cache"] == split["cache"] == cfg.n_routed_experts - 3 and f"cache {r['cache']}/layer" in printed.err
    assert split["budget"] == round(size) and split["total"] <= split["budget"] and split["positions"] == 12
    assert re.search(rf"budget {size / 1e6:.4g} MB: resident weights .* = .* of", printed.err)
    counted = split["resident"] + split["slots"] + split["kv"]  # mmap's read buffers are released after each read
    held = r["memory"]["held_bytes"]
    assert held == r["held_bytes"] and counted <= held <= counted + split["margin"] and held <= split["budget"]
    assert "within the budget" in printed.out and "measured: tensors held" in printed.out


def test_help_states_the_units_and_the_margin(capsys):
    with pytest.raises(SystemExit):
        oi.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "512MiB: 1024^n B" in text and budget.MARGIN_TEXT in text


def test_cli_budget_errors_are_one_line(tiny):
    _, path = tiny(MAIN)
    base = ["--model", str(path), "--prompt-ids", "1,2,3"]
    cases = {
        "too small": ([*base, "--budget", "1MB"], "--budget 1MB is too small: the resident weights"),
        "and cache": ([*base, "--budget", "20MB", "--cache", "2"], "give --budget or --cache"),
        "and compile": ([*base, "--budget", "20MB", "--compile"], "give --budget or --cache"),
        "no unit": ([*base, "--budget", "15"], "--budget must be a size such as 15MB"),
    }
    assert_cli_errors("offload_infer.py", cases, cwd=oi.Path(oi.__file__).parent)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_per_layer_counts_sum_to_totals_and_equal_a_recount(policy, tiny, capsys):
    """Over the decode steps: per layer, hits and misses = cache.simulate replaying the recorded routing
    (warm from the prefill), bytes read = misses x one expert on disk (mmap reads exactly the tensors);
    together, the report's totals; the report prints one entry per layer."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=3, policy=policy))
    prompt, new = random_ids(cfg.vocab_size, 1, 6, seed=5)[0].tolist(), 10
    _, report = engine.generate(prompt, new)
    engine.close()
    layers = report.per_layer
    assert [c.layer for c in layers] == cfg.moe_layers
    sim = cache.simulate([engine.record.trace()], policy, 3, cache.SimOptions(warmup_steps=1))
    assert [c.hits for c in layers] == sim.hits.sum(0).tolist()
    assert [c.misses for c in layers] == sim.misses.sum(0).tolist()
    assert [c.bytes_read for c in layers] == [c.misses * engine.store.expert_bytes for c in layers]
    decode = engine.record.totals(1)
    assert sum(c.hits for c in layers) == decode.hits and sum(c.misses for c in layers) == decode.misses
    assert sum(c.bytes_read for c in layers) == decode.bytes_read > 0
    assert report.hit_rate == pytest.approx(decode.hits / (decode.hits + decode.misses))
    assert all(c.tokens == new - 1 and c.hits + c.misses == cfg.num_experts_per_tok * (new - 1) for c in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_counts_the_pinned_staging_buffers(tiny):
    """On CUDA the loader holds one pinned host copy of an expert per read in flight: the split counts them
    (with mmap's file pages), and the tensors held after decoding (weights, slots, KV cache on the GPU, the
    pinned copies) stay within the budget."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    prompt, new = random_ids(cfg.vocab_size, 1, 5)[0].tolist(), 6
    watch = budget.MemoryWatch("cuda")
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cuda", budget="2MB", positions=len(prompt) + new))
    _, report = engine.generate(prompt, new)
    engine.close()
    split, threads = engine.split, oi.ExpertLoader.READ_THREADS
    assert 1 <= engine.opts.cache == split.cache <= cfg.n_routed_experts
    assert engine.loader.nbytes == threads * budget.expert_bytes(cfg, engine.dtype)
    assert split.read_buffers == engine.loader.nbytes + threads * engine.store.expert_bytes
    assert split.resident + split.slots + split.kv <= report.held_bytes <= split.budget
    assert watch.figures(report.held_bytes)["cuda_max_allocated_bytes"] > split.slots
