"""Cache-aware routing with a guarantee (model.guaranteed_topk, offload_infer.py --cache-keep/--cache-margin)
and the drift every cache-aware run reports (model.routing_drift: agreement with the true top-k, KL from the
true routing weights), against brute force: random scores and random cached sets for the rule, plain-list
recomputations for the drift, a resident decode loop with a brute-force LRU list for the engine, bench.py and
the batched forward that train.py --train-routing trains under (cache.steered).
"""
import contextlib
import copy
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import cache
import checkpoint
import model
import offload_infer as oi
import testbed
import train
from oracles import drift, guaranteed_choice, lru_hits, resident_cache_aware
from tiny import assert_cli_errors, finetune_args, random_ids

REPO = Path(__file__).resolve().parent.parent

MAIN = "ds2-mla-greedy"  # 8 experts, top-3, layer 0 dense then 2 MoE layers


def random_case(seed, N=64, E=12):
    """Router-like scores (N, E) (softmax: every score distinct) and a random cached set per token (N, E)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(N, E, generator=gen).mul(2).softmax(-1)
    cached = torch.rand(N, E, generator=gen) < torch.rand(N, 1, generator=gen)  # from none to all cached
    return scores, cached


@pytest.mark.parametrize("seed", range(4))
def test_guaranteed_topk_by_brute_force(seed):
    """The rule slot by slot (oracles.guaranteed_choice), and what it promises: the true top-J always chosen;
    every other chosen expert either in the true top-k or cached and within the margin; best first."""
    scores, cached = random_case(seed)
    for k in (1, 3, 5):
        for keep in range(k + 1):
            for margin in (0.0, 0.01, 0.05, 0.2, 1.0):
                got = model.guaranteed_topk(scores, k, cached, keep, margin)
                for s, c, row in zip(scores.tolist(), cached.tolist(), got.tolist()):
                    held = {e for e, h in enumerate(c) if h}
                    assert row == guaranteed_choice(s, k, held, keep, margin), (k, keep, margin)
                    order = sorted(range(len(s)), key=lambda e: -s[e])
                    assert set(order[:keep]) <= set(row) and len(set(row)) == k
                    floor = s[order[k - 1]] - margin
                    assert all(e in order[:k] or (e in held and s[e] >= floor) for e in row)
                    assert [s[e] for e in row] == sorted((s[e] for e in row), reverse=True)


def test_guaranteed_topk_fills_from_the_cache():
    """Worked by hand: scores 0.40 0.25 0.15 0.12 0.05 0.03, k = 3. Plain: 0 1 2. Keep 1, margin 0.05, cached
    {3, 4}: the floor is 0.15 - 0.05 = 0.10, so 3 (0.12) qualifies and 4 (0.05) does not; the second slot takes 3,
    the third falls back to the best left, 1. Margin 0.11 lets 4 in too: 0 3 4. Nothing cached: plain."""
    s = torch.tensor([[0.40, 0.25, 0.15, 0.12, 0.05, 0.03]])
    cached = torch.tensor([False, False, False, True, True, False])
    assert model.guaranteed_topk(s, 3, cached, 1, 0.05).tolist() == [[0, 1, 3]]
    assert model.guaranteed_topk(s, 3, cached, 1, 0.11).tolist() == [[0, 3, 4]]
    assert model.guaranteed_topk(s, 3, cached, 0, 0.11).tolist() == [[0, 3, 4]]  # 0 is best and within the margin
    assert model.guaranteed_topk(s, 3, torch.zeros(6, dtype=torch.bool), 0, 1.0).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("vid", ["ds2-mla-greedy", "ds2-group-limited", "ds3-noaux-norm", "qwen2-norm-topk",
                                 "mixtral-gqa", "olmoe"])
def test_gate_guaranteed_mode(vid, loaded):
    """model.Gate: J = K or margin 0 is plain routing, exactly; otherwise the choice is the rule's on the gate's
    scores (greedy routers), the weights those of the chosen experts by the gate's own normalisation, and a
    dropped group of a group-limited router stays dropped even when all its experts are cached."""
    net = loaded(vid)
    cfg = net.config
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    gate = net.model.layers[cfg.moe_layers[0]].mlp.gate
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    plain = gate(x)
    cached = torch.rand(E, generator=torch.Generator().manual_seed(2)) < 0.5
    for keep, margin in ((K, 1.0), (0, 0.0), (K - 1, 0.0)):
        for a, b in zip(gate(x, cached=cached, keep=keep, margin=margin), plain):
            assert torch.equal(a, b), (keep, margin)
    for keep in range(K):
        for margin in (0.02, 0.1, 10.0):
            indices, weights, scores = gate(x, cached=cached, keep=keep, margin=margin)
            assert torch.equal(scores, plain[2])
            assert (indices[:, :keep] == plain[0][:, :keep]).all() or keep == 0
            # weights: the scores of the chosen experts, normalised and scaled as the gate does for its own choice
            w = scores.gather(-1, indices)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) if cfg.norm_topk_prob else w
            torch.testing.assert_close(weights, w * cfg.routed_scaling_factor)
            if cfg.topk_method == "greedy":
                held = {e for e in range(E) if cached[e]}
                want = [guaranteed_choice(s, K, held, keep, margin) for s in scores.tolist()]
                assert indices.tolist() == want, (keep, margin)
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):  # only dropped groups cached, any margin: no effect
        choice = plain[2] + gate.e_score_correction_bias if cfg.topk_method == "noaux_tc" else plain[2]
        grouped = choice.view(len(x), cfg.n_group, -1)  # (N, G, E/G)
        best = grouped.topk(2, dim=-1).values.sum(-1) if cfg.topk_method == "noaux_tc" else grouped.max(-1).values
        kept = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(cfg.topk_group, dim=-1).indices, True)
        dropped = ~kept.repeat_interleave(E // cfg.n_group, dim=1)  # (N, E) the experts of the dropped groups
        assert dropped.any(-1).all()
        for a, b in zip(gate(x, cached=dropped, keep=0, margin=10.0), plain):
            assert torch.equal(a, b)


def test_routing_drift_by_brute_force():
    """Agreement and KL of random used sets (some equal to the true top-k) against oracles.drift; equal sets
    give exactly 1 and 0; a hand case: true {0, 1}, used {0, 2} agree on half."""
    scores, _ = random_case(5, N=50, E=10)
    gen = torch.Generator().manual_seed(6)
    true = scores.topk(3, dim=-1).indices
    used = torch.stack([torch.randperm(10, generator=gen)[:3] for _ in range(50)])
    used[::4] = true[::4]
    agreement, kl = model.routing_drift(scores, true, used)
    for i, (s, t, u) in enumerate(zip(scores.tolist(), true.tolist(), used.tolist())):
        a, k = drift(s, t, u)
        assert agreement[i].item() == pytest.approx(a)
        assert kl[i].item() == pytest.approx(k, rel=1e-4, abs=1e-6)
        assert kl[i].item() >= 0
    assert (agreement[::4] == 1).all() and (kl[::4] == 0).all()
    assert (kl[agreement < 1] > 0).all()
    s = torch.tensor([[0.5, 0.3, 0.2]])
    a, k = model.routing_drift(s, torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    assert a.item() == 0.5 and k.item() == pytest.approx(drift([0.5, 0.3, 0.2], [0, 1], [0, 2])[1], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# the engine and bench.py: against a resident decode loop with a brute-force LRU list


@pytest.mark.parametrize("rule", [dict(keep=1, margin=0.05), dict(keep=0, margin=0.2), dict(bias=0.1)])
def test_cache_aware_point_against_a_resident_loop(rule, tiny, loaded):
    """bench.cache_aware (one batched pass under cache.steered) recomputed: hit rate,
    perplexity, top-1, agreement and KL from oracles.resident_cache_aware."""
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    windows = random_ids(net.config.vocab_size, 2, 13, seed=3)
    capacity, bias, keep, margin = 4, rule.get("bias", 0.0), rule.get("keep"), rule.get("margin", 0.0)
    point, top1, trace = bench.cache_aware(path, windows, capacity, bias, "cpu", None, keep, margin)
    rate, ppl, want_top1, agreement, kl = resident_cache_aware(net, windows, capacity, bias, keep, margin)
    assert point["hit_rate"] == pytest.approx(rate)
    assert point["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert torch.equal(top1, want_top1)
    assert point["agreement"] == pytest.approx(agreement) and point["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert point["agreement"] < 1 and point["kl"] > 0  # these rules do move tokens on this model
    assert trace.shape == (2, 12, len(net.config.moe_layers), net.config.num_experts_per_tok)
    assert (point.get("keep"), point.get("margin", 0.0), point["bias"]) == (keep, margin, bias)


def test_plain_and_guaranteed_runs_report_drift(tiny, loaded, tmp_path, capsys):
    """offload_infer.py end to end: plain routing, J = K and margin 0 report agreement 1 and KL 0 and decode
    the resident model's tokens; a guaranteed run moves some choices (agreement < 1, KL > 0) and hits more."""
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    K = net.config.num_experts_per_tok
    prompt = random_ids(net.config.vocab_size, 1, 6, seed=6)
    want = model.generate(net, prompt, 16)[0, 6:].tolist()
    base = ["--model", str(path), "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--cache", "4",
            "--max-new-tokens", "16", "--temperature", "0"]
    results = {}
    for name, flags in {"plain": [], "J=K": ["--cache-keep", str(K), "--cache-margin", "1"],
                        "margin 0": ["--cache-keep", "0"], "guaranteed": ["--cache-keep", "1", "--cache-margin", "0.2"]}.items():
        oi.main([*base, *flags, "--json", str(tmp_path / "out.json")])
        printed = capsys.readouterr().out
        r = results[name] = json.loads((tmp_path / "out.json").read_text())
        assert f"agreement with the true top-k {r['agreement']:.3f}, KL {r['kl']:.4f}" in printed
        if name != "guaranteed":
            assert (r["agreement"], r["kl"], r["generated_ids"]) == (1.0, 0.0, want), name
    g = results["guaranteed"]
    assert g["agreement"] < 1 and g["kl"] > 0 and g["cache_keep"] == 1 and g["cache_margin"] == 0.2
    assert g["hit_rate"] > results["plain"]["hit_rate"]


def test_bad_routing_flags_are_one_line(tiny):
    _, path = tiny(MAIN)
    base = ["--model", str(path), "--prompt-ids", "1,2,3"]
    cases = {
        "keep > K": ([*base, "--cache-keep", "4"], "--cache-keep must be in 0..3"),
        "keep < 0": ([*base, "--cache-keep", "-1"], "--cache-keep must be in 0..3"),
        "negative margin": ([*base, "--cache-keep", "1", "--cache-margin", "-0.1"], "--cache-margin >= 0"),
        "with a bias": ([*base, "--cache-keep", "1", "--cache-bias", "0.1"], "no --cache-bias"),
    }
    assert_cli_errors("offload_infer.py", cases, cwd=oi.Path(oi.__file__).parent)


# ----------------------------------------------------------------------------------------------
# training under cache-aware routing (train.py --train-routing): the batched forward routes as the device does

@pytest.mark.parametrize("rule", [{"bias": 0.1}, {"keep": 1, "margin": 0.05}, {"keep": 0, "margin": 0.2}])
def test_steered_forward_against_a_resident_loop(rule, loaded):
    """Under cache.steered, one batched forward of several windows routes each token as the resident decode loop
    with a brute-force LRU list does (oracles.resident_cache_aware): the same perplexity, top-1 and hit rate; the
    routing differs from plain routing, and plain routing is back after the block."""
    net = loaded(MAIN)
    windows = random_ids(net.config.vocab_size, 3, 13, seed=7)
    capacity = 4
    with torch.no_grad():
        plain = net(windows[:, :-1], return_routing=True)
        with cache.steered(net, capacity, rule):
            logits, routing = net(windows[:, :-1], return_routing=True)  # (N, T, V)
        again = net(windows[:, :-1], return_routing=True)
    rate, ppl, top1, _, _ = resident_cache_aware(net, windows, capacity, rule.get("bias", 0.0), rule.get("keep"),
                                                 rule.get("margin", 0.0))
    ce = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert math.exp(ce) == pytest.approx(ppl, rel=1e-5)
    assert torch.equal(logits.argmax(-1), top1)
    hits = sum(lru_hits(seq, capacity) for r in routing for seq in r.indices.tolist())
    assert hits / sum(r.indices.numel() for r in routing) == pytest.approx(rate)
    assert any(not torch.equal(a.indices, b.indices) for a, b in zip(routing, plain[1]))  # the rule moved choices
    assert torch.equal(again[0], plain[0]) and all(m.route is None for m in net.moes())


def test_steered_weights_carry_gradients(loaded):
    """The steered choice is not differentiable, but the chosen experts' combine weights are the router's scores:
    a loss on the steered forward reaches every router."""
    net = copy.deepcopy(loaded(MAIN))
    windows = random_ids(net.config.vocab_size, 2, 9, seed=8)
    net.requires_grad_(False)
    for m in net.moes():
        m.gate.weight.requires_grad_(True)
    with cache.steered(net, 4, {"keep": 1, "margin": 0.1}):
        logits = net(windows[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).backward()
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in net.moes())


def test_training_runs_under_its_routing(corpus, base_run, tmp_path, monkeypatch):
    """train.py --train-routing: every training step's forward runs under the rule over an LRU cache of 2 x top-k
    (the base model's anchor pass under plain routing), the run lands in its own sweep folder with the rule in its
    settings, and bench.py finds it with that rule."""
    shutil.copytree(base_run / "base", tmp_path / "base")
    K = checkpoint.read_config(tmp_path / "base").num_experts_per_tok
    seen, real_step, real_base = [], train.train_step, train.base_model_pass

    def step(cfg, procs, *args, **kwargs):
        seen.append([m.route.keywords if m.route else None for m in procs.model.moes()])
        return real_step(cfg, procs, *args, **kwargs)

    def base_pass(model, *args):  # the anchor's target: the base model as it is, plain routing
        def forward(*a, **k):
            seen.append("base" if all(m.route is None for m in model.moes()) else "base, steered")
            return type(model).forward(model, *a, **k)
        model.forward = forward
        try:
            return real_base(model, *args)
        finally:
            del model.forward

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "base_model_pass", base_pass)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(finetune_args(corpus, tmp_path, "--stage-steps", "2,0,1", "--sweep", "0", "--train-routing",
                                 "keep:1:0.05"))
    rule = {"capacity": 2 * K, "rule": {"keep": 1, "margin": 0.05}, "drift": None, "prompt_len": 0}
    L = len(checkpoint.read_config(tmp_path / "base").moe_layers)
    assert seen == [[rule] * L, "base"] * 3  # stages of 2, 0 and 1 steps
    folder = train.sweep_dir(tmp_path, "distill", 0.0, routing="keep:1:0.05")
    assert folder.name == "distill-keep10.05-lambda0"
    assert json.loads((folder / "remoe" / "results.json").read_text())["settings"]["train_routing"] == "keep:1:0.05"
    found = bench.sweep_models(tmp_path / "sweep", tmp_path / "base")
    assert [(m["path"], m["routing"], m["rule"]) for m in found] == [(str(folder / "remoe"), "keep:1:0.05",
                                                                       {"keep": 1, "margin": 0.05})]


def test_bad_train_routing_is_one_line(corpus, base_run, tmp_path):
    shutil.copytree(base_run / "base", tmp_path / "base")
    K = checkpoint.read_config(tmp_path / "base").num_experts_per_tok
    cases = {name: (finetune_args(corpus, tmp_path, "--train-routing", value), "--train-routing")
             for name, value in (("no kind", "0.05"), ("zero bias", "bias:0"), ("keep = K", f"keep:{K}:0.1"),
                                 ("no margin", "keep:1"), ("not a number", "bias:x"))}
    assert_cli_errors(REPO / "train.py", cases, cwd=tmp_path)
    assert not (tmp_path / "remoe").exists()


def test_bad_train_routing_stops_before_pretraining(tmp_path):
    """With no base model yet, a bad rule is refused against the default base's top-k before it is pretrained."""
    K = testbed.DEFAULT_BASE["num_experts_per_tok"]
    cases = {"keep = K": (["--out", str(tmp_path / "run"), "--train-routing", f"keep:{K}:0.1"], "--train-routing")}
    assert_cli_errors(REPO / "train.py", cases, cwd=tmp_path)
    assert not (tmp_path / "run" / "base").exists()
