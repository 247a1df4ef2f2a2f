"""bench.py: one `--quick` run on a tiny base model and its ReMoE twin (both built with train.py, as
tests/test_train.py builds them), then every figure of its results.json recomputed independently:
perplexity and top-1 from model.py's logits, reuse from router.reuse_rate, cache hit rates by
brute-force LRU / LFU / Belady loops over the models' own routing, cache-aware routing by a resident
decode loop (model.py's modules, the Gate's bonus or the guaranteed rule by brute force, a brute-force LRU
list: oracles.resident_cache_aware) instead of the offload engine, decoded tokens by model.generate. Bad input must end in one `error:` line and exit code 2.
"""
import contextlib
import copy
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
import cache
import checkpoint
import offload_infer as oi
import router
import train
from data import DataConfig, eval_windows, prepare_data
from oracles import BRUTE, resident_cache_aware
from tiny import assert_cli_errors, finetune_args, load_oracle, random_ids, read_tensors

REPO = Path(__file__).resolve().parent.parent
MAIN = "ds2-mla-greedy"  # tests/tiny.py's variant with 8 experts, top-3, layer 0 dense then 2 MoE layers
SEQ_LEN, WINDOWS = 32, 4
ROUTED = "keep:1:0.05"  # a sweep run trained under the guaranteed rule
PARETO = ["1", "2"]  # the front at top-k and 2 x top-k (--quick alone: 2 x top-k)
SMALL = ["--seq-len", str(SEQ_LEN), "--windows", str(WINDOWS), "--threads", "1", "--device", "cpu"]  # CPU references


# ----------------------------------------------------------------------------------------------
# fixtures: a tiny base/tuned pair, one quick run, and the models' own teacher-forced outputs

@pytest.fixture(scope="module")
def pair(corpus, base_run, tmp_path_factory):
    """The session's small base model (conftest.py) and a short ReMoE fine-tune of it."""
    out = tmp_path_factory.mktemp("bench-pair")
    shutil.copytree(base_run / "base", out / "base")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(finetune_args(corpus, out))
        train.main(finetune_args(corpus, out, "--stage-steps", "2,0,0", "--sweep", "0,1"))  # the control and a front
        train.main(finetune_args(corpus, out, "--stage-steps", "2,0,0", "--sweep", "0", "--train-routing", ROUTED))
    return {"corpus": corpus, "base": out / "base", "tuned": out / "remoe", "data_dir": out / "data", "root": out,
            "sweep": out / "sweep"}


def pair_args(pair):
    return ["--base", str(pair["base"]), "--tuned", str(pair["tuned"]), "--data", str(pair["corpus"]),
            "--data-dir", str(pair["data_dir"]), "--sweep", str(pair["sweep"])]


@pytest.fixture(scope="module")
def run(pair):
    """`python bench.py --quick` on the pair, in process; its printed output, files and results."""
    out = pair["root"] / "bench"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main([*pair_args(pair), "--quick", *SMALL, "--pareto-multiples", *PARETO, "--out", str(out)])
    return {"out": out, "printed": printed.getvalue(), "results": json.loads((out / "results.json").read_text()),
            "traces": dict(np.load(out / "traces.npz"))}


@pytest.fixture(scope="module")
def truth(pair):
    """Each model's logits and routing on the same test windows, from one plain model.py forward."""
    _, _, data = prepare_data(DataConfig(data=str(pair["corpus"])), pair["data_dir"], pair["base"])
    windows = eval_windows(data.test, SEQ_LEN, WINDOWS)  # (W, T+1)
    out = {"windows": windows, "test": data.test}
    for name in ("base", "tuned"):
        net = checkpoint.load_model(pair[name])
        with torch.no_grad():
            logits, routing = net(windows[:, :-1], return_routing=True)
        out[name] = {"net": net, "logits": logits, "indices": [r.indices for r in routing]}  # [L] (W, T, K)
    return out


# ----------------------------------------------------------------------------------------------
def hit_rate(indices, capacity, policy="lru"):
    """Hits over all layers and windows / requests, for indices [L] (W, T, K)."""
    hits = sum(BRUTE[policy](seq, capacity) for idx in indices for seq in idx.tolist())
    return hits / sum(idx.numel() for idx in indices)


def test_oracles_by_hand():
    """Capacity 2, one expert per token: 0 1 2 0 1. LRU: 2 evicts 0, 0 evicts 1, 1 evicts 2: no hit.
    LFU: every count is 1 when 2 arrives, so recency decides as in LRU: no hit. Belady: 2 evicts 1
    (next needed at t4, 0 at t3), so 0 hits at t3: one hit.
    Capacity 3, top-2: [0,1] [2,0] [3,1] [2,0]. t1 hits 0, t2 hits 1; 3 needs a slot and may not take
    1's: LRU evicts 2 (0 was used at t1), LFU evicts 2 too (1 request against 0's 2), Belady 0 or 2
    (both return at t3). Each then misses one of t3's two experts: 3 hits for all three policies."""
    one = [[0], [1], [2], [0], [1]]
    two = [[0, 1], [2, 0], [3, 1], [2, 0]]
    assert [BRUTE[p](one, 2) for p in ("lru", "lfu", "belady")] == [0, 0, 1]
    assert [BRUTE[p](two, 3) for p in ("lru", "lfu", "belady")] == [3, 3, 3]
    for seq, c in ((one, 2), (two, 3)):  # cache.py agrees with the oracles on these
        trace = [[[[*step]]] for step in seq]  # one window, one layer, one token per step
        for p in BRUTE:
            assert cache.simulate([trace], p, c).hits.sum().item() == BRUTE[p](seq, c), p


# ----------------------------------------------------------------------------------------------
# the quick run: outputs, then each section against its oracle

def test_quick_run_writes_every_output(run):
    out, r = run["out"], run["results"]
    md = (out / "results.md").read_text()
    assert run["printed"].strip() == md.strip()
    for heading in ("## Summary", "## Quality", "## Reuse", "## Cache study", "## Pareto front", "## Decode",
                    "## Peers"):
        assert heading in md
    assert "cold start" in md or "starts with empty caches" in md  # the cache study states its method
    assert len(r["files"]["plots"]) == 5
    for name in ("hit_rate.png", "pareto.png", "decode_time.png", "latency.png", "reuse_per_layer.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # atomic writes leave no temp files
    assert r["settings"]["quick"] and r["data"]["windows"] == WINDOWS and r["data"]["seq_len"] == SEQ_LEN


def test_only_the_default_run_rewrites_results_md(run, tmp_path):
    """RESULTS.md comes from `python bench.py` as it is: --out, --threads and --device may differ, nothing else.
    The quick run above wrote none; written here from its results, it holds the report and the plots it links."""
    assert bench.is_default_run(bench.parse_args([])) and bench.is_default_run(bench.parse_args(["--out", "x", "--threads", "1"]))
    for flags in (["--quick"], ["--windows", "8"], ["--base", "elsewhere"], ["--no-peers"]):
        assert not bench.is_default_run(bench.parse_args(flags)), flags
    md = (run["out"] / "results.md").read_text().strip()
    text = bench.write_results_md(run["results"], md, tmp_path / "RESULTS.md").read_text()
    assert md in text and text.startswith("<!-- written by `python bench.py`")
    for plot in run["results"]["files"]["plots"]:
        name = Path(plot).name
        assert f"(results/{name})" in text and (tmp_path / "results" / name).read_bytes() == Path(plot).read_bytes()


def test_perplexity_and_top1_from_logits(run, truth):
    q = run["results"]["quality"]
    targets = truth["windows"][:, 1:]
    for name in ("base", "tuned"):
        logits = truth[name]["logits"]
        ppl = math.exp(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
        assert q[name]["perplexity"] == pytest.approx(ppl, rel=1e-5), name
        agree = (logits.argmax(-1) == truth["base"]["logits"].argmax(-1)).double().mean().item()
        assert q[name]["top1_agreement_with_base"] == pytest.approx(agree)
    assert q["perplexity_ratio"] == pytest.approx(q["tuned"]["perplexity"] / q["base"]["perplexity"])


def test_reuse_from_router_reuse_rate(run, truth):
    ru = run["results"]["reuse"]
    for w in (1, 2, 4):
        for name in ("base", "tuned"):
            per_layer = [router.reuse_rate(idx, w) for idx in truth[name]["indices"]]
            assert ru[name]["per_layer"][str(w)] == pytest.approx(per_layer)
            assert ru[name]["overall"][str(w)] == pytest.approx(sum(per_layer) / len(per_layer))
        assert ru["change"][str(w)] == pytest.approx(ru["tuned"]["overall"][str(w)] / ru["base"]["overall"][str(w)] - 1)


def test_recorded_traces_are_the_models_routing(run, truth):
    for name in ("base", "tuned"):
        assert np.array_equal(run["traces"][f"routing_{name}"], torch.stack(truth[name]["indices"]).numpy())


def test_cache_study_by_brute_force(run, truth):
    cs = run["results"]["cache_study"]
    cfg = truth["base"]["net"].config
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert cs["capacities"] == bench.capacity_grid(bench.QUICK["capacity_multiples"], K, E, with_all=True)
    assert cs["capacities"][0] == K and cs["capacities"][-1] == E
    tokens = WINDOWS * SEQ_LEN
    for name in ("base", "tuned"):
        for policy in ("lru", "lfu", "belady"):
            for row in cs[name][policy]:
                want = hit_rate(truth[name]["indices"], row["capacity"], policy)
                assert row["hit_rate"] == pytest.approx(want), (name, policy, row["capacity"])
                requests = tokens * K * len(truth[name]["indices"])
                assert row["loads_per_token"] == pytest.approx((1 - want) * requests / tokens)
        for lru, bel in zip(cs[name]["lru"], cs[name]["belady"]):
            assert bel["hit_rate"] >= lru["hit_rate"] - 1e-12  # nothing beats the optimum


def test_certificate_against_edited_models(run, truth):
    """The quality section's ablations: the learned perplexity is the model's own, and switching the
    routed experts off equals zeroing every routed expert's down projection in a copy of the model."""
    a = run["results"]["quality"]["ablations"]
    windows = truth["windows"]
    for name in ("base", "tuned"):
        net = truth[name]["net"]
        assert a[name]["learned"] == pytest.approx(run["results"]["quality"][name]["perplexity"], rel=1e-6)
        zeroed = copy.deepcopy(net)
        with torch.no_grad():
            for key, p in zeroed.named_parameters():
                if ".experts." in key and key.endswith("down_proj.weight"):
                    p.zero_()
            logits = zeroed(windows[:, :-1])
        ppl = math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
        assert a[name]["routed_experts_off"] == pytest.approx(ppl, rel=1e-5)


def test_pareto_points_against_a_resident_loop(run, truth, pair):
    """Every point of the front at every cache recomputed: plain routing by brute-force LRU over model.py's
    routing, cache-aware routing by a resident decode loop with a brute-force LRU list; per-layer hit rates by
    the same LRU one layer at a time; fronts and the verdict by brute force over the points."""
    pa = run["results"]["pareto"]
    n = pa["windows"]
    cfg = truth["base"]["net"].config
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert pa["capacity"] == min(2 * K, E)
    assert [x["capacity"] for x in pa["caches"]] == bench.capacity_grid([float(m) for m in PARETO], K, E) == [K, 2 * K]
    windows = truth["windows"][:n]
    base_top1 = truth["base"]["logits"][:n].argmax(-1)
    J = bench.QUICK["pareto_keep"]
    assert pa["keep"] == J and pa["margins"] == list(bench.QUICK["pareto_margins"])
    nets = {"base": truth["base"]["net"], "tuned": truth["tuned"]["net"],
            **{str(pair["sweep"] / d / "remoe"): checkpoint.load_model(pair["sweep"] / d / "remoe")
               for d in ("distill-lambda0", "distill-lambda1", "distill-keep10.05-lambda0")}}
    for entry in pa["caches"]:
        c = entry["capacity"]
        assert set(entry["families"]) == {"base + cache-aware", "ReMoE + cache-aware", "lambda=0 control + cache-aware",
                                          "ReMoE lambda sweep (distill)", f"base + guaranteed J={J}",
                                          f"ReMoE + guaranteed J={J}", f"lambda=0 control + guaranteed J={J}",
                                          f"ReMoE trained under {ROUTED} (distill)"}
        # the run trained under the rule is measured under it, not by plain routing
        assert [(p["keep"], p["margin"], p["lambda"]) for p in entry["families"][f"ReMoE trained under {ROUTED} (distill)"]] \
            == [(1, 0.05, 0.0)]
        for family, pts in entry["families"].items():
            for p in pts:
                check_point(p, family, nets[p["model"]], windows, c, J, base_top1, run, entry)
            # the front by brute force: no point has both a higher-or-equal hit rate and a lower-or-equal perplexity
            front = [p for p in pts if not any((q["hit_rate"], -q["perplexity"]) != (p["hit_rate"], -p["perplexity"])
                                               and q["hit_rate"] >= p["hit_rate"] and q["perplexity"] <= p["perplexity"]
                                               for q in pts)]
            assert sorted(map(json.dumps, front)) == sorted(map(json.dumps, entry["fronts"][family]))
        check_verdict(entry)
        # at the largest bonus, cache-aware routing hits at least as often as the same model's plain routing
        for family, pts in entry["families"].items():
            biased = [p for p in pts if p["bias"] == max(pa["biases"])]
            if biased:
                assert biased[0]["hit_rate"] >= next(p for p in pts if p["bias"] == 0)["hit_rate"]


def check_point(p, family, net, windows, c, J, base_top1, run, entry):
    n, T = windows.shape[0], windows.shape[1] - 1
    if p["bias"] == 0 and "keep" not in p:
        assert (p["agreement"], p["kl"]) == (1.0, 0.0)  # a model's plain routing is its own top-k
        with torch.no_grad():
            logits, routing = net(windows[:, :-1], return_routing=True)
        indices = [r.indices for r in routing]
        assert p["hit_rate"] == pytest.approx(hit_rate(indices, c))
        ce = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
        assert p["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
        per_window = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").sum(1)  # (n,)
        assert p["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-5)
        top1 = logits.argmax(-1)
    else:
        assert ("guaranteed" in family or "trained under" in family) == ("keep" in p) and p.get("keep", J) == J
        rate, ppl, top1, agreement, kl = resident_cache_aware(net, windows, c, p["bias"], p.get("keep"),
                                                              p.get("margin", 0.0))
        assert p["agreement"] == pytest.approx(agreement) and p["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert p["hit_rate"] == pytest.approx(rate), (family, p)
        assert p["perplexity"] == pytest.approx(ppl, rel=1e-5), (family, p)
        indices = list(torch.from_numpy(run["traces"][p["trace"]].astype(np.int64)))  # [L] (N, T, K)
        assert hit_rate(indices, c) == pytest.approx(p["hit_rate"])
    assert p["layer_hit_rates"] == pytest.approx([hit_rate([idx], c) for idx in indices])
    assert p["top1_agreement_with_base"] == pytest.approx((top1 == base_top1).double().mean().item())
    # the perplexity change's interval: a paired t-interval over windows of the loss difference per token,
    # by hand (Student's t for 95% with n - 1 degrees of freedom, from a printed table)
    base_nll = entry["families"]["base + cache-aware"][0]["window_nll"]
    d = np.array([(a - b) / T for a, b in zip(p["window_nll"], base_nll)])
    half = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}[n - 1] * d.std(ddof=1) / math.sqrt(n)
    # (the table's t has 5 digits: 1e-4 relative on the half-width)
    assert p["perplexity_change_ci95"] == pytest.approx([math.exp(d.mean() - half) - 1, math.exp(d.mean() + half) - 1],
                                                        rel=1e-3, abs=1e-8)
    assert sum(p["window_nll"]) / (n * T) == pytest.approx(math.log(p["perplexity"]), rel=1e-9)


def check_verdict(entry):
    """Per budget, brute force over every family's points: the best hit rate within the budget, the family that
    reaches the highest and its point."""
    for v in entry["verdict"]:
        limit = entry["base_perplexity"] * (1 + v["budget"])
        within = {f: [p for p in pts if p["perplexity"] <= limit] for f, pts in entry["families"].items()}
        for family, pts in within.items():
            assert v["best_hit_rate"][family] == (max(p["hit_rate"] for p in pts) if pts else None)
        best = max(p["hit_rate"] for pts in within.values() for p in pts)  # the base model's plain point is within
        winner = entry["families"][v["winner"]][v["winner_index"]]
        assert winner["hit_rate"] == best and winner["perplexity"] <= limit
    assert [v["budget"] for v in entry["verdict"]] == list(bench.BUDGETS)


def test_best_point_decode_at_every_cache(run, pair):
    """At every cache of the front, the best point within +0.5% decoded the same tokens as the base model's plain
    engine: its perplexity on those tokens is its own model's, its hit rate the cache-aware one; the speedup
    follows from the per-window times, and results.md reports it under each cache."""
    md = (run["out"] / "results.md").read_text()
    dec = run["results"]["decode"]
    P = dec["prompt_tokens"]
    windows = torch.tensor(dec["window_ids"])[1:]  # the decode table's windows, the warm-up left out
    for entry in run["results"]["pareto"]["caches"]:
        d = entry["decode"]
        v = next(v for v in entry["verdict"] if v["budget"] == d["budget"] == 0.005)
        assert (d["family"], d["point"]) == (v["winner"], v["winner_index"])
        best, base = d["contenders"]["best"], d["contenders"]["base"]
        assert base["speedup"] == pytest.approx(1.0) and best["speedup_ci95"][0] <= best["speedup"] <= best["speedup_ci95"][1]
        assert best["windows"] == base["windows"] == dec["windows"]
        p = entry["families"][d["family"]][d["point"]]
        if p["bias"] == 0 and "keep" not in p:  # plain routing: the model's own teacher-forced perplexity
            net = checkpoint.load_model({"base": pair["base"], "tuned": pair["tuned"]}.get(p["model"], p["model"]))
            with torch.no_grad():
                logits = net(windows)
            nll = F.cross_entropy(logits[:, P:-1].flatten(0, 1), windows[:, P + 1:].flatten())
            assert best["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
        assert f"Best point within +0.5% at cache {entry['capacity']}: {d['family']}" in md
        assert f"### Cache {entry['capacity']}" in md
    assert "certificate random / off" in md


def test_decode_rows(run, truth):
    """Every contender decoded the same held-out tokens: the plain models' perplexity equals model.py's
    teacher-forced one on those windows, their loads per token equal the simulator's replay of
    model.py's routing (prefill as one step, then one token per step, cold cache per window), the
    figures summarise the per-window ones, and the base model's engine is set against its physical bound
    at the same capacities."""
    dec = run["results"]["decode"]
    cfg = truth["base"]["net"].config
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert [row["capacity"] for row in dec["rows"]] == bench.capacity_grid(bench.QUICK["decode_multiples"], K, E)
    P, C = dec["prompt_tokens"], dec["decode_tokens"]
    windows = torch.tensor(dec["window_ids"])  # (N + 1, P + C), the first a warm-up
    assert windows.shape == (dec["windows"] + 1, P + C)
    assert windows[0].tolist() == [int(t) for t in truth["test"][: P + C]]  # the test split's fixed windows
    bias = bench.QUICK.get("decode_bias", bench.Settings.decode_bias)
    for row in dec["rows"]:
        assert set(row["contenders"]) == {"base", "tuned", f"base + cache-aware {bias:g}", f"tuned + cache-aware {bias:g}"}
        for name in ("base", "tuned"):
            net = truth[name]["net"]
            with torch.no_grad():
                logits, routing = net(windows[1:], return_routing=True)  # (N, P + C, V): every fed token
            nll = F.cross_entropy(logits[:, P:-1].flatten(0, 1), windows[1:, P + 1:].flatten(), reduction="sum")
            c = row["contenders"][name]
            assert c["perplexity"] == pytest.approx(math.exp(nll.item() / windows[1:, P + 1:].numel()), rel=1e-5)
            for w in range(dec["windows"]):
                ids = [r.indices[w].tolist() for r in routing]  # [L][T][K]
                trace = [[layer[:P] for layer in ids]] + [[[layer[t]] for layer in ids] for t in range(P, P + C)]
                sim = cache.simulate([trace], "lru", row["capacity"], cache.SimOptions(warmup_steps=1))
                assert row["per_window"][name]["loads_per_token"][w] == pytest.approx(sim.misses_per_token)
            assert c["predicted_ms_per_token"] > 0  # this machine's prediction beside each plain (model, cache) row
            assert c["predicted_over_measured"] == pytest.approx(c["predicted_ms_per_token"] / c["ms_per_token"])
        for name, c in row["contenders"].items():
            per = row["per_window"][name]
            assert c["ms_per_token"] == pytest.approx(1e3 * sum(per["s_per_token"]) / len(per["s_per_token"]))
            logs = [math.log(b / s) for b, s in zip(row["per_window"]["base"]["s_per_token"], per["s_per_token"])]
            assert c["speedup"] == pytest.approx(math.exp(sum(logs) / len(logs)))
            assert c["speedup_ci95"][0] <= c["speedup"] <= c["speedup_ci95"][1]
            assert c["mb_per_token"] * 1e6 >= c["loads_per_token"] * dec["expert_bytes"] - 1e-6  # whole blocks read
    check_bound(dec["bound"], [row["capacity"] for row in dec["rows"]])  # the base model's engine at the same caches
    assert "The engine against the physical bound" in (run["out"] / "results.md").read_text()


def test_best_point_latency(run):
    """The front's best point within +0.5% perplexity (highest hit rate) at 2 x top-k against the base model's plain
    routing, on every profile: resident time + loads per token x one miss's time, by hand."""
    r = run["results"]
    pa, lat, b = bench.headline(r["pareto"]), r["decode"]["latency"], r["decode"]["latency"]["best_point"]
    within = [p for pts in pa["fronts"].values() for p in pts if p["perplexity"] <= 1.005 * pa["base_perplexity"]]
    best = max(within, key=lambda p: p["hit_rate"])
    assert b["point"]["hit_rate"] == best["hit_rate"] and b["point"]["loads_per_token"] == best["loads_per_token"]
    assert best in pa["fronts"][b["family"]]
    base = pa["families"]["base + cache-aware"][0]
    assert b["base_loads_per_token"] == base["loads_per_token"]
    row = next(x for x in r["decode"]["rows"] if x["capacity"] == pa["capacity"])["machine"]
    here = b["profiles"][0]  # this machine: the decode row's resident time, lone read and slowdown per read
    assert here["name"] == "this machine" and len(b["profiles"]) == len(lat["profiles"])
    for key, loads in (("base_ms", base["loads_per_token"]), ("best_ms", best["loads_per_token"])):
        want = row["resident_ms_per_token"] + loads * (row["read_ms"][0] + row["slowdown_ms_per_read"])
        assert here[key] == pytest.approx(want)
    assert all(x["speedup"] == pytest.approx(x["base_ms"] / x["best_ms"]) for x in b["profiles"])
    assert "best point within +0.5% perplexity" in (run["out"] / "results.md").read_text()


def test_free_generation(run, truth):
    """Free generation is reported apart from the speedups: every model sampled from the same prompts with
    the same seeds; each run's hit rate and loads agree (every decode token requests K distinct experts per
    MoE layer, so hit rate = 1 - loads / (K L)), the distinct-token ratio is a ratio, and the table shows
    the means of the runs."""
    free = run["results"]["decode"]["free"]
    cfg = truth["base"]["net"].config
    K, L = cfg.num_experts_per_tok, len(cfg.moe_layers)
    assert set(free["runs"]) == {"base", "tuned"} and free["temperature"] == bench.FREE_TEMPERATURE
    for name, runs in free["runs"].items():
        assert [r["seed"] for r in runs] == list(bench.FREE_SEEDS) * free["prompts"]
        for r in runs:
            assert r["hit_rate"] == pytest.approx(1 - r["loads_per_token"] / (K * L))
            assert 0 < r["distinct_ratio"] <= 1
        for key, value in free["models"][name].items():
            assert value == pytest.approx(sum(r[key] for r in runs) / len(runs))
    assert "Free generation (not a speedup" in (run["out"] / "results.md").read_text()


def test_peer_rows(run):
    """Every resident decoder side by side; transformers decodes model.py's greedy tokens, and llama.cpp
    (installed wherever the tests run: .ci/run builds it) has its row from the exported GGUF."""
    p = run["results"]["peers"]
    names = list(p["tokens_per_s"])
    assert names[0] == "remoe engine, all experts cached" and "remoe model.generate" in names
    assert any(n.startswith("transformers") for n in names) and "llama.cpp (float32 GGUF)" in names
    for name, tps in p["tokens_per_s"].items():
        assert tps > 0 and p["vs_engine"][name] == pytest.approx(p["tokens_per_s"][names[0]] / tps)
    assert "remoe engine, all experts cached, --compile" in names, p["notes"]
    assert all(p["same_greedy_tokens"].values()) and len(p["same_greedy_tokens"]) == 4  # engines, model.py, transformers
    assert "llama.cpp" in (run["out"] / "results.md").read_text()


def test_peers_leave_out_copies_that_would_not_fit(pair, monkeypatch):
    """A real-shaped model's peers hold the weights several times over: when another copy would not fit in
    the memory available, the compiled engine and transformers are left out with the reason, and the
    rest is measured (instead of the kernel killing the run)."""
    monkeypatch.setattr(bench, "memory_available", lambda: 10_000)  # bytes: less than any model here
    p = bench.peers(pair["base"], [5, 6, 7, 8], 3, 1, torch.device("cpu"), torch.float32)
    assert list(p["tokens_per_s"]) == ["remoe engine, all experts cached", "remoe model.generate"]
    notes = " ".join(p["notes"])
    assert notes.count("would not fit in the 0.0 GB available") == 2 and "--compile" in notes and "transformers" in notes


# ----------------------------------------------------------------------------------------------
# settings and bad input

def test_capacity_grid_and_quick_defaults():
    # the default model: top-4 of 32 -> 4, 6, 8, 12, 16, 24, 32
    assert bench.capacity_grid(bench.Settings.capacity_multiples, 4, 32, with_all=True) == [4, 6, 8, 12, 16, 24, 32]
    assert bench.capacity_grid((1, 2, 4), 2, 8) == [2, 4, 8]
    assert bench.capacity_grid((4, 8), 3, 8) == [8]  # capped at E
    s = bench.parse_args(["--quick", "--windows", "5"])
    assert (s.windows, s.pareto_windows, s.decode_tokens) == (5, bench.QUICK["pareto_windows"],
                                                              bench.QUICK["decode_tokens"])
    s = bench.parse_args([])
    assert (s.windows, s.quick, s.peers) == (bench.Settings.windows, False, True)
    assert bench.parse_args(["--no-peers"]).peers is False
    assert (s.pareto_multiples, bench.parse_args(["--quick"]).pareto_multiples) == ((1, 2, 4), (2,))


def test_bad_input_is_one_line(pair, tmp_path):
    def variant(name, **changes):
        """A copy of the tuned model whose config.json differs from the base model's."""
        dst = tmp_path / name
        shutil.copytree(pair["tuned"], dst)
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
        return dst

    data = ["--data", str(pair["corpus"]), "--data-dir", str(pair["data_dir"]), "--out", str(tmp_path / "out")]
    cases = {
        "missing base": (["--base", str(tmp_path / "nope"), "--tuned", str(pair["tuned"])],
                         "model folder does not exist"),
        "missing tuned": (["--base", str(pair["base"]), "--tuned", str(tmp_path / "nope")], "python train.py"),
        "other architecture": (["--base", str(pair["base"]), "--tuned", str(variant("arch", model_type="qwen3_moe"))],
                               "differ in model_type"),
        "other expert count": (["--base", str(pair["base"]), "--tuned", str(variant("experts", n_routed_experts=16))],
                               "differ in n_routed_experts"),
        "capacity > E": ([*pair_args(pair), "--capacities", "2", "99"], "capacity 99 must be between 1 and"),
        "decode capacity > E": ([*pair_args(pair), "--only", "decode", "--decode-capacities", "99"],
                                "capacity 99 must be between 1 and"),
        "only what": ([*pair_args(pair), "--only", "peers"], "invalid choice"),
        "front without 2 x top-k": ([*pair_args(pair), "--pareto-keep", "1", "--pareto-multiples", "1", "4"], "include 2 (the headline"),
    }
    assert_cli_errors(REPO / "bench.py", cases, cwd=tmp_path, extra=data)
    assert not (tmp_path / "out").exists()  # nothing is written before the input is checked


def test_only_decode_on_the_pair(pair, tmp_path, capsys):
    """`python bench.py --only decode`: base and tuned, plain and cache-aware, on the same windows at every
    decode capacity, then the base model's engine against its physical bound; decode.json's summary follows
    from its per-window figures, and decode.md (also printed) holds both tables."""
    out = tmp_path / "only"
    bench.main([*pair_args(pair), "--only", "decode", "--decode-windows", "2", "--prompt-tokens", "4",
                "--decode-tokens", "6", "--decode-capacities", "2", "4", "--decode-bias", "0.05", "--threads", "1",
                "--out", str(out)])
    printed = capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["decode.json", "decode.md"]
    assert printed.strip() == (out / "decode.md").read_text().strip()
    dec = json.loads((out / "decode.json").read_text())["decode"]
    assert len(dec["window_ids"]) == 3 and all(len(w) == 10 for w in dec["window_ids"])
    assert [row["capacity"] for row in dec["rows"]] == [2, 4] and "free" not in dec
    for row in dec["rows"]:
        assert list(row["contenders"]) == ["base", "base + cache-aware 0.05", "tuned", "tuned + cache-aware 0.05"]
        for name, s in row["contenders"].items():
            per = row["per_window"][name]
            assert len(per["s_per_token"]) == 2 and s["ms_per_token"] == pytest.approx(1e3 * sum(per["s_per_token"]) / 2)
            assert name in printed
    check_bound(dec["bound"], [2, 4])
    assert "bound ms, 4 in flight" in printed


def test_same_token_decode(tiny, loaded):
    """Every contender replays the same windows: the plain engine's NLL equals model.py's on those
    tokens (so it saw them); loads per token equal cache.simulate on each window's recorded routing,
    cold; cache-aware routing changes routing, not the tokens; the summary's interval and speedup come
    from the per-window figures."""
    _, path = tiny(MAIN)
    net = loaded(MAIN)
    windows = random_ids(net.config.vocab_size, 4, 12, seed=11)  # (N, P + C)
    P, cap = 5, 3
    engines = {"plain": oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=cap)),
               "biased": oi.OffloadEngine(path, oi.OffloadConfig(device="cpu", cache=cap, cache_bias=0.5))}
    runs = bench.same_token_decode(engines, windows, P, warmup=1)
    for e in engines.values():
        e.close()
    for name, r in runs.items():
        assert len(r["s_per_token"]) == 3 and r["tokens"] == 3 * (12 - P - 1)
    with torch.no_grad():
        logits = net(windows[1:, :-1])  # (3, 11, V): position t predicts t + 1
    targets = windows[1:, P + 1:]
    want = torch.nn.functional.cross_entropy(logits[:, P:].flatten(0, 1), targets.flatten(), reduction="none")
    got = torch.tensor(runs["plain"]["nll"], dtype=torch.float64)
    assert torch.allclose(got, want.view(3, -1).sum(1).double(), rtol=1e-5)  # float32 sums of ~6 terms
    # loads per token of each window = the simulator's, replaying that window's routing from a cold cache
    steps = engines["plain"].record.steps
    per_window = len(steps) // 4  # prefill + 7 one-token steps per window, warm-up window first
    for w in range(1, 4):
        chunk = steps[w * per_window:(w + 1) * per_window]
        sim = cache.simulate([[s.routing for s in chunk]], "lru", cap, cache.SimOptions(warmup_steps=1))
        assert runs["plain"]["loads_per_token"][w - 1] == pytest.approx(sim.misses_per_token)
    summary = bench.summarize_runs(runs, "plain")
    ratios = [math.log(a / b) for a, b in zip(runs["plain"]["s_per_token"], runs["biased"]["s_per_token"])]
    mean = sum(ratios) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in ratios) / 2)
    half = 4.3027 * sd / math.sqrt(3)  # t(2 dof, 97.5%) from the table
    assert summary["biased"]["speedup"] == pytest.approx(math.exp(mean))
    assert summary["biased"]["speedup_ci95"] == pytest.approx([math.exp(mean - half), math.exp(mean + half)], rel=1e-3)
    assert summary["plain"]["speedup"] == pytest.approx(1.0)
    assert summary["biased"]["hit_rate"] >= summary["plain"]["hit_rate"]


def test_physical_bound_rows(tiny):
    """The bound is resident time + MB missed / bandwidth, from the same replay; more cache, fewer MB."""
    _, path = tiny(MAIN)
    cfg = checkpoint.read_config(path)
    windows = random_ids(cfg.vocab_size, 3, 10, seed=12)
    result = bench.physical_bound(path, windows, 4, [2, 8], log=lambda *a: None)
    check_bound(result, [2, 8])
    small, full = result["rows"]
    # with all 8 experts cached each is read at most once per layer and window; 2 slots for a top-3 thrash
    assert full["loads_per_token"] <= 8 * len(cfg.moe_layers) / 6 < small["loads_per_token"]


def check_bound(result, capacities):
    """Each row's bound is resident time + MB missed / bandwidth (one read at a time, and with reads in flight)."""
    bw, resident = result["bandwidth_bytes_per_s"], result["resident_ms_per_token"]
    assert [row["cache"] for row in result["rows"]] == capacities and result["in_flight"] == oi.ExpertLoader.READ_THREADS
    for row in result["rows"]:
        assert row["bound_ms"] == pytest.approx(resident + row["mb_per_token"] * 1e6 / bw * 1e3)
        assert row["ratio_to_bound"] == pytest.approx(row["ms_per_token"] / row["bound_ms"])
        strict = resident + row["mb_per_token"] * 1e6 / result["parallel_bandwidth_bytes_per_s"] * 1e3
        assert row["bound_parallel_ms"] == pytest.approx(strict)
        assert row["ratio_to_parallel_bound"] == pytest.approx(row["ms_per_token"] / strict)



def test_shape_study_on_a_small_shape(tmp_path, monkeypatch):
    """--shape with a small stand-in for a published shape: the checkpoint is bfloat16 in the HF layout
    (transformers loads it), the active bytes are every non-expert weight but one embedding row plus K
    experts per MoE layer, and the offload rows come with their I/O bound."""
    small = dict(bench.SHAPES["qwen3-30b-a3b"], hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                 vocab_size=128, max_position_embeddings=256)
    monkeypatch.setitem(bench.SHAPES, "small", small)
    s = bench.parse_args(["--out", str(tmp_path), "--decode-windows", "2", "--prompt-tokens", "4", "--decode-tokens",
                          "6", "--repeats", "1", "--threads", "1", "--no-compile"])
    result = bench.shape_study(s, "small", log=lambda *a: None)
    path = tmp_path / "shapes" / "small"
    assert {t.dtype for t in read_tensors(path).values()} == {torch.bfloat16}
    hf = load_oracle(path)
    cfg = checkpoint.read_config(path)
    per_expert = 3 * 64 * 32
    non_expert = sum(p.numel() for n, p in hf.named_parameters() if ".experts." not in n) - (128 - 1) * 64
    assert result["active_bytes_per_token"] == 4 * (non_expert + len(cfg.moe_layers) * 4 * per_expert)
    assert result["bandwidth_bound_ms"] == pytest.approx(
        result["active_bytes_per_token"] / result["gemv_bandwidth_bytes_per_s"] * 1e3)
    assert [r["cache"] for r in result["offload"]["rows"]] == bench.capacity_grid(bench.Settings.decode_multiples, 4, 16)
    assert all(result["peers"]["same_greedy_tokens"].values())  # model.py decodes as transformers does


def test_llama_cpp_under_memory_limits(run):
    """Where llama.cpp and cgroup v1 are there (as root on this project's machines), both models ran at
    every limit; each limit is the measured overhead + the non-expert bytes + m x top-k experts per
    layer, recomputed here from the GGUF with the gguf package's own reader."""
    lm = run["results"]["llama_memory"]
    missing = bench.memory_cgroup_missing()
    if missing is not None:
        assert lm == {"skipped": missing}
        return
    import gguf
    reader = gguf.GGUFReader(str(run["out"] / "gguf" / "base.gguf"))
    experts = {t.name.split(".")[1]: 0 for t in reader.tensors if "_exps" in t.name}
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if "_exps" in t.name) / len(experts)
    other = sum(int(t.n_bytes) for t in reader.tensors if "_exps" not in t.name and t.name != "token_embd.weight")
    E, K = (reader.get_field(f"deepseek2.{k}").contents() for k in ("expert_count", "expert_used_count"))
    assert {(x["multiple"], x["model"]) for x in lm["rows"]} == {(m, n) for m in bench.QUICK["llama_multiples"]
                                                                  for n in ("base", "tuned")}
    for x in lm["rows"]:
        assert x["limit_bytes"] == int(lm["overhead_bytes"] + other + x["multiple"] * K * len(experts) * expert_bytes / E)
        assert x["runs"] == 1 and x["time_per_token_s"] > 0 and x["majflt_per_token"] >= 0
    assert "llama.cpp under a memory limit" in (run["out"] / "results.md").read_text()
