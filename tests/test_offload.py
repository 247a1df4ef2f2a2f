"""Tests for offload_infer.py: the offloaded decode must produce exactly the tokens of the
all-resident model (model.generate, greedy) for every cache size, policy and I/O mode; its counts
must add up and equal cache.py's simulator replaying the routing it recorded; cache-aware routing
must reduce to plain routing at bias 0; bad input must end in one `error:` line and exit code 2.
(The engine's benchmarks, same-token decoding and the physical bound, are tested in test_bench.py.)
The engine runs on the CPU here, where its references are computed; the CUDA paths (slots on the GPU,
parallel loads through pinned buffers, the compiled step replayed as a CUDA graph) have tests at the end
that compare on the GPU, against the resident model on the same GPU.
"""
import json

import pytest
import torch

import cache
import checkpoint
import model
import offload_infer as oi
import record
from tiny import (assert_cli_errors, make_checkpoint, random_ids, read_config, read_tensors, write_checkpoint,
                  write_fp8_checkpoint)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread, because on a shared 2-core machine OpenMP's hand-offs between threads
    cost more than these (64-wide) matrices, slowing the decode loop tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MAIN = "ds2-mla-greedy"  # 8 experts, top-3, layer 0 dense then 2 MoE layers
NEW_TOKENS = 8


def reference_tokens(net, prompt, new_tokens=NEW_TOKENS):
    return model.generate(net, prompt, new_tokens)


def check_counts(engine, prompt_len, new_tokens):
    """The engine's counts add up and equal the simulator's replay of the routing it recorded."""
    cfg = engine.cfg
    L, K = len(cfg.moe_layers), cfg.num_experts_per_tok
    steps = engine.record.steps
    assert len(steps) == new_tokens  # the prefill, then new_tokens - 1 decode steps
    assert [s.tokens for s in steps] == [prompt_len] + [1] * (new_tokens - 1)
    decode = engine.record.totals(1)
    assert decode.hits + decode.misses == K * (new_tokens - 1) * L  # hits + misses = top-k x tokens x MoE layers
    assert all(len(p.cache.slot_of) <= engine.opts.cache for p in engine.providers)
    trace = engine.record.trace()
    sim = cache.simulate([trace], engine.opts.policy, engine.opts.cache)  # defaults: cold, per layer
    assert sim.hits.tolist() == [s.hits for s in steps] and sim.misses.tolist() == [s.misses for s in steps]
    return cache.simulate([trace], engine.opts.policy, engine.opts.cache, cache.SimOptions(warmup_steps=1))


@pytest.mark.parametrize("io", ["mmap", "direct"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_tokens_equal_resident_model_for_every_cache_size(policy, io, tiny, loaded):
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    prompt = random_ids(net.config.vocab_size, 1, 6, seed=3)
    want = reference_tokens(net, prompt)
    for capacity in range(1, net.config.n_routed_experts + 1):
        engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=capacity, policy=policy, io=io))
        assert engine.store.io == io, engine.store.fallback
        out, report = engine.generate(prompt[0].tolist(), NEW_TOKENS)
        engine.close()
        assert torch.equal(out, want), f"cache {capacity}"
        sim = check_counts(engine, prompt.shape[1], NEW_TOKENS)
        assert report.hit_rate == pytest.approx(sim.hit_rate)  # the simulator's hit rate for this decode
        assert report.loads_per_token == pytest.approx(sim.misses_per_token)
        assert report.generated_ids == want[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("vid", ["mixtral-gqa", "qwen2-sparse-step2", "ds3-noaux-norm", "olmoe", "qwen3-gqa-headdim",
                                 "ds2-group-limited"])
def test_tokens_equal_resident_model_other_architectures(vid, tiny, loaded):
    _, path = tiny(vid)
    net = loaded(vid)
    cfg = net.config
    prompt = random_ids(cfg.vocab_size, 1, 5, seed=1)
    want = reference_tokens(net, prompt)
    for capacity in sorted({1, cfg.num_experts_per_tok, cfg.n_routed_experts}):
        engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=capacity))
        out, _ = engine.generate(prompt[0].tolist(), NEW_TOKENS)
        engine.close()
        assert torch.equal(out, want), f"{vid} cache {capacity}"
        check_counts(engine, prompt.shape[1], NEW_TOKENS)


def test_experts_computed_together_equal_the_reference_loop(tiny, loaded, monkeypatch):
    """One decode token's K experts computed together (one gather, two batched matmuls) give the layer
    output of model.run_experts' loop over the same slots, within float32 summation-order error (the
    batched matmul adds the K products in another order: ~1e-7 relative, bound 1e-5 at |y| ~ 1); and
    with the batched path switched off the engine decodes the same tokens."""
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    cfg = net.config
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=cfg.n_routed_experts))
    engine.preload_all()
    provider = engine.providers[0]
    moe = net.model.layers[provider.layer].mlp
    x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    indices, weights, _ = moe.gate(x)
    engine.record.steps.append(record.Step(tokens=1))  # the record the provider writes its counts into
    together = provider.run(x, indices, weights)
    loop = model.run_experts(x, indices, weights, provider)
    resident = model.run_experts(x, indices, weights, moe.experts)
    assert together.shape == (1, cfg.hidden_size)
    assert (together - loop).abs().max() < 1e-5 and (together - resident).abs().max() < 1e-5
    prompt = random_ids(cfg.vocab_size, 1, 6, seed=3)[0].tolist()
    want, _ = engine.generate(prompt, NEW_TOKENS)
    engine.close()
    monkeypatch.setattr(oi.OffloadedExperts, "TOGETHER_BELOW_BYTES", 0)  # every expert through the loop
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=cfg.n_routed_experts))
    out, _ = engine.generate(prompt, NEW_TOKENS)
    engine.close()
    assert torch.equal(out, want)


@pytest.mark.parametrize("vid", [MAIN, "qwen3-gqa-headdim"])  # MLA (interleaved rope), GQA (q/k norms, half rope)
def test_compiled_decode_equals_the_eager_engine(vid, tiny, loaded):
    """--compile: the whole one-token step as one torch.compile graph over a fixed-size KV cache gives the
    greedy tokens of model.generate, and the eager engine's logits on a replayed window within 1e-4 (the
    compiled kernels add in another order: float32 rounding, ~1e-6 at |logits| ~ 4); its decode steps
    never went through the host's cache lookup (no routing recorded), and count every request a hit."""
    _, path = tiny(vid)
    net = loaded(vid)
    cfg = net.config
    E = cfg.n_routed_experts
    prompt = random_ids(cfg.vocab_size, 1, 6, seed=3)
    compiled = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=E, compile=True))
    out, report = compiled.generate(prompt[0].tolist(), NEW_TOKENS)
    assert torch.equal(out, reference_tokens(net, prompt))
    assert report.hit_rate == 1.0 and report.loads_per_token == 0
    decode = compiled.record.steps[1:]
    again, _ = compiled.generate(prompt[0].tolist(), NEW_TOKENS)  # on the reused static cache, stale contents masked
    assert torch.equal(again, out)
    assert all(s.routing == [] and s.hits == [cfg.num_experts_per_tok] * len(cfg.moe_layers) for s in decode)
    eager = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=E))
    eager.preload_all()
    window = random_ids(cfg.vocab_size, 1, 14, seed=5)[0].tolist()
    _, tot, got = compiled.replay(window, 4)
    _, _, want = eager.replay(window, 4)
    assert tot.tokens == 10 and (got - want).abs().max() < 1e-4
    for e in (compiled, eager):
        e.close()


def test_compile_failure_is_a_user_error(tiny, monkeypatch):
    """Where torch.compile cannot build the step (no C++ compiler, say), --compile ends in one clear error."""
    _, path = tiny(MAIN)

    def broken(*args, **kwargs):
        def step(*a, **k):
            raise RuntimeError("InductorError: C++ compile error\ng++: not found")
        return step
    monkeypatch.setattr(oi.torch, "compile", broken)
    with pytest.raises(oi.UserError, match=r"^--compile failed \(InductorError: C\+\+ compile error\); decode without"):
        oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=checkpoint.read_config(path).n_routed_experts, compile=True))


def test_bf16_and_fp8_checkpoints(tmp_path):
    """Experts stored in bf16 or FP8 are converted to float32 when loaded into a slot: the tokens
    equal model.py's resident model of the same checkpoint."""
    _, src = make_checkpoint(tmp_path / "src", "deepseek_v3")
    tensors = {k: v.to(torch.bfloat16) for k, v in read_tensors(src).items()}
    write_checkpoint(tmp_path / "bf16", tensors, read_config(src))
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "deq", block_size=(16, 16))
    for path in (tmp_path / "bf16", tmp_path / "fp8"):
        net = checkpoint.load_model(path)
        prompt = random_ids(net.config.vocab_size, 1, 5, seed=2)
        want = reference_tokens(net, prompt)
        for capacity, io in ((2, "mmap"), (5, "direct")):
            engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=capacity, io=io))
            assert engine.dtype == torch.float32
            out, _ = engine.generate(prompt[0].tolist(), NEW_TOKENS)
            engine.close()
            assert torch.equal(out, want), f"{path.name} cache {capacity}"


def test_prefetch_keeps_tokens(tiny, loaded):
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    prompt = random_ids(net.config.vocab_size, 1, 6, seed=4)
    want = reference_tokens(net, prompt)
    for capacity in (1, 3, 5):
        engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=capacity, prefetch=True))
        out, report = engine.generate(prompt[0].tolist(), NEW_TOKENS)
        engine.close()
        assert torch.equal(out, want)
        assert report.prefetch_loads > 0
        assert all(len(p.cache.slot_of) <= capacity for p in engine.providers)


def test_sampling_matches_model_generate(tiny, loaded):
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    prompt = random_ids(net.config.vocab_size, 1, 4, seed=5)
    want = model.generate(net, prompt, NEW_TOKENS, 0.8, 0.9, torch.Generator().manual_seed(7))
    engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=3))
    out, _ = engine.generate(prompt[0].tolist(), NEW_TOKENS, 0.8, 0.9, torch.Generator().manual_seed(7))
    engine.close()
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------------------------
# cache-aware routing


@pytest.mark.parametrize("vid", ["ds2-mla-greedy", "ds2-group-limited", "ds3-noaux-norm", "qwen2-norm-topk",
                                 "mixtral-gqa", "olmoe"])
def test_gate_with_zero_bonus_equals_plain_gate(vid, loaded):
    """Cache-aware routing is model.Gate with a selection bonus: zero bonus is exactly plain routing,
    and a large bonus makes the favoured experts win the top-k."""
    net = loaded(vid)
    cfg = net.config
    x = torch.randn(20, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    gate = net.model.layers[cfg.moe_layers[0]].mlp.gate
    want = gate(x)
    got = gate(x, torch.zeros(cfg.n_routed_experts))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    bonus = torch.zeros(cfg.n_routed_experts)
    favoured = list(range(0, cfg.n_routed_experts, cfg.n_routed_experts // cfg.num_experts_per_tok))
    favoured = favoured[: cfg.num_experts_per_tok]
    bonus[favoured] = 100.0
    if cfg.topk_method == "greedy":
        assert sorted(gate(x, bonus)[0][0].tolist()) == favoured


def test_cache_bias_raises_hit_rate(tiny, loaded):
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    prompt = random_ids(net.config.vocab_size, 1, 6, seed=6)
    for capacity in (3, 4, 6):
        rates = []
        for bias in (0.0, 0.5):
            engine = oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=capacity, cache_bias=bias))
            out, report = engine.generate(prompt[0].tolist(), 16)
            engine.close()
            rates.append(report.hit_rate)
            if bias == 0.0:
                assert torch.equal(out, reference_tokens(net, prompt, 16))  # bias 0 is plain routing
        assert rates[1] >= rates[0], (capacity, rates)


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_writes_json(tiny, loaded, tmp_path, capsys):
    """The demo samples by default (temperature 0.8, top-p 0.95, seed 0: model.generate's tokens with the same
    generator), greedy with --temperature 0; the cache figures come last, and the JSON holds them."""
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    prompt = random_ids(net.config.vocab_size, 1, 5, seed=8)
    sampled = model.generate(net, prompt, 6, 0.8, 0.95, torch.Generator().manual_seed(0))[0, 5:].tolist()
    for flags, want in (([], sampled), (["--temperature", "0"], reference_tokens(net, prompt, 6)[0, 5:].tolist())):
        out_file = tmp_path / "sub" / "decode.json"
        oi.main(["--model", str(path), "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--cache", "2",
                 "--max-new-tokens", "6", "--json", str(out_file), *flags])
        printed = capsys.readouterr()
        last = printed.out.strip().splitlines()[-3:]  # hit rate, then per MoE layer, then the memory measured
        assert [line.split()[0] for line in last] == ["hit", "decode", "measured:"] and "device: cpu" in printed.err
        assert ("; greedy" in printed.err) == bool(flags)
        result = json.loads(out_file.read_text())
        assert result["prompt_ids"] == prompt[0].tolist()
        assert result["generated_ids"] == want, flags
        assert (result["temperature"], result["top_p"], result["seed"]) == ((0.0 if flags else 0.8), 0.95, 0)
        for key in ("ttft_s", "time_per_token_s", "tokens_per_s", "hit_rate", "loads_per_token", "mb_read_per_token",
                    "expert_memory_mb"):
            assert isinstance(result[key], float), key
        assert [f.name for f in (tmp_path / "sub").iterdir()] == ["decode.json"]  # no temp left
    assert sampled != reference_tokens(net, prompt, 6)[0, 5:].tolist()  # so the default is not greedy


@pytest.fixture(scope="module")
def no_experts(tiny, tmp_path_factory):
    _, src = tiny(MAIN)
    dst = tmp_path_factory.mktemp("no-experts")
    write_checkpoint(dst, {k: v for k, v in read_tensors(src).items() if ".experts." not in k}, read_config(src))
    return dst


def test_cli_bad_input_is_one_line(tiny, no_experts):
    _, path = tiny(MAIN)
    ids = "1,2,3"
    cases = {
        "cache 0": (["--model", str(path), "--cache", "0", "--prompt-ids", ids], "--cache must be between 1 and"),
        "cache > E": (["--model", str(path), "--cache", "9", "--prompt-ids", ids], "--cache must be between 1 and"),
        "no experts": (["--model", str(no_experts), "--prompt-ids", ids], "no routed expert tensors"),
        "long prompt": (["--model", str(path), "--prompt-ids", ",".join(["5"] * 300)],
                        "longer than the model's context"),
        "no tokenizer": (["--model", str(path), "--prompt", "hello"], "no tokenizer.json"),
        "compile offloaded": (["--model", str(path), "--cache", "4", "--compile", "--prompt-ids", ids],
                              "--compile needs every expert resident"),
    }
    assert_cli_errors("offload_infer.py", cases, cwd=oi.Path(oi.__file__).parent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_resident_model(tiny):
    """Slots on the GPU, loads through pinned buffers on a copy stream: same tokens as the resident
    model on the same GPU (float32, so that the two compute identically)."""
    _, path = tiny(MAIN)
    net = checkpoint.load_model(path, device="cuda")
    prompt = random_ids(net.config.vocab_size, 1, 6, seed=9).cuda()
    want = reference_tokens(net, prompt, 12)
    for capacity, prefetch in ((1, False), (3, False), (3, True), (8, False)):
        engine = oi.OffloadEngine(path, oi.OffloadConfig(cache=capacity, device="cuda", dtype="float32",
                                                         prefetch=prefetch))
        assert engine.providers[0].slots.gate.is_cuda
        out, report = engine.generate(prompt[0].tolist(), 12)
        engine.close()
        assert torch.equal(out, want), (capacity, prefetch)
        if not prefetch:
            check_counts(engine, prompt.shape[1], 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_decode_replays_a_graph(tiny):
    """--compile on CUDA: the compiled one-token step recorded as a CUDA graph and replayed gives the greedy
    tokens of model.generate on the same GPU (float32; TF32 stays off, PyTorch's default), twice in a row on
    the reused static cache, and the eager engine's replayed logits within 1e-4 (float32 rounding of fused
    kernels, as on the CPU)."""
    _, path = tiny(MAIN)
    net = checkpoint.load_model(path, device="cuda")
    cfg = net.config
    prompt = random_ids(cfg.vocab_size, 1, 6, seed=3).cuda()
    want = reference_tokens(net, prompt, 12)
    compiled = oi.OffloadEngine(path, oi.OffloadConfig(cache=cfg.n_routed_experts, device="cuda", dtype="float32",
                                                       compile=True))
    assert all(graph is not None for _, graph in compiled.static_caches.values())
    for _ in range(2):
        out, _ = compiled.generate(prompt[0].tolist(), 12)
        assert torch.equal(out, want)
    eager = oi.OffloadEngine(path, oi.OffloadConfig(cache=cfg.n_routed_experts, device="cuda", dtype="float32"))
    eager.preload_all()
    window = random_ids(cfg.vocab_size, 1, 14, seed=5)[0].tolist()
    _, _, got = compiled.replay(window, 4)
    _, _, ref = eager.replay(window, 4)
    assert (got - ref).abs().max() < 1e-4
    for e in (compiled, eager):
        e.close()
