"""testbed.py's certificate: the two ablations that show whether a model's quality depends on its routing.
Each ablation is checked against an independent construction of the same model (weights edited in a
copy), the model is restored bit for bit afterwards, and the base report carries the certificate."""

import copy
import json
import math

import pytest
import torch

import testbed
import model as remoe
from tiny import assert_close, random_ids


@pytest.fixture(scope="module", params=["ds2-mla-greedy", "qwen2-norm-topk", "mixtral-gqa"])
def net(request, loaded):
    return request.param, loaded(request.param)


def state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_routed_experts_off_equals_zeroed_experts(net):
    """Switching the routed experts off is the model whose routed experts output zero (down_proj = 0):
    the shared part, dense layers and attention stay (Qwen2-MoE keeps its gated shared expert)."""
    vid, net = net
    windows = random_ids(net.config.vocab_size, 3, 17, seed=1)
    before = state(net)
    with testbed.routed_experts_off(net):
        off = testbed.windows_loss(net, windows)
    zeroed = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in zeroed.named_parameters():
            if ".experts." in name and name.endswith("down_proj.weight"):
                p.zero_()
    assert off == pytest.approx(testbed.windows_loss(zeroed, windows), rel=1e-6)
    assert off != pytest.approx(testbed.windows_loss(net, windows), rel=1e-5)  # the experts did matter
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # restored


def test_random_routers_keep_each_rows_norm(net):
    vid, net = net
    gates = [b.mlp.gate for b in net.model.layers if isinstance(b.mlp, remoe.MoE)]
    learned = [g.weight.detach().clone() for g in gates]
    with testbed.random_routers(net, seed=3):
        for g, w in zip(gates, learned):
            assert torch.allclose(g.weight.norm(dim=1), w.norm(dim=1), rtol=1e-5)  # float32 rescaling
            cos = torch.nn.functional.cosine_similarity(g.weight, w, dim=1)
            assert cos.abs().max() < 0.9  # new directions (random rows in 64 dims: |cos| ~ 0.1)
    with testbed.random_routers(net, seed=3):
        again = [g.weight.detach().clone() for g in gates]
    with testbed.random_routers(net, seed=4):
        other = [g.weight.detach().clone() for g in gates]
    assert not torch.equal(again[0], other[0])  # the seed decides the rows, and only the seed
    assert all(torch.equal(g.weight, w) for g, w in zip(gates, learned))  # restored


def test_ablations_figures(net):
    vid, net = net
    windows = random_ids(net.config.vocab_size, 2, 9, seed=2)
    a = testbed.ablations(net, windows, seeds=(0, 1))
    assert a["learned"] == pytest.approx(math.exp(testbed.windows_loss(net, windows)))
    seeds = []
    for s in (0, 1):
        with testbed.random_routers(net, s):
            seeds.append(math.exp(testbed.windows_loss(net, windows)))
    assert a["random_router_seeds"] == pytest.approx(seeds)
    assert a["random_router"] == pytest.approx(sum(seeds) / 2)
    assert a["random_router_change"] == pytest.approx(a["random_router"] / a["learned"] - 1)
    assert a["routed_experts_off_change"] == pytest.approx(a["routed_experts_off"] / a["learned"] - 1)


def test_base_report_prints_the_certificate(base_run, capsys):
    results = json.loads((base_run / "base" / "results.json").read_text())
    a = results["test"]["ablations"]
    assert set(a) >= {"learned", "random_router", "routed_experts_off"}
    assert a["learned"] == pytest.approx(results["test"]["perplexity"], rel=1e-6)
    testbed.print_base_report(results)
    out = capsys.readouterr().out
    assert "random routers" in out and "routed experts off" in out


def test_per_layer_ablations_touch_only_their_layer(net):
    """One layer at a time: switching off layer l's routed experts equals zeroing only layer l's expert
    down projections; random routers in layer l leave every other router as it was."""
    vid, net = net
    windows = random_ids(net.config.vocab_size, 2, 9, seed=5)
    a = testbed.ablations(net, windows, seeds=(0,))
    learned = math.exp(testbed.windows_loss(net, windows))
    layers = net.config.moe_layers
    assert sorted(a["per_layer"], key=int) == [str(l) for l in layers]
    for l in layers:
        zeroed = copy.deepcopy(net)
        with torch.no_grad():
            for name, p in zeroed.named_parameters():
                if name.startswith(f"model.layers.{l}.mlp.experts.") and name.endswith("down_proj.weight"):
                    p.zero_()
        want = math.exp(testbed.windows_loss(zeroed, windows)) / learned - 1
        assert a["per_layer"][str(l)]["routed_experts_off_change"] == pytest.approx(want, rel=1e-5, abs=1e-9)
        gates = {b.mlp.layer: b.mlp.gate.weight.detach().clone() for b in net.model.layers
                 if isinstance(b.mlp, remoe.MoE)}
        with testbed.random_routers(net, 0, layers=[l]):
            for b in net.model.layers:
                if isinstance(b.mlp, remoe.MoE):
                    assert torch.equal(b.mlp.gate.weight, gates[b.mlp.layer]) == (b.mlp.layer != l)


def test_router_weights_swaps_routers_in_and_back(net):
    """train.py's base model pass and the random routers both put other router weights into the same
    network: within the block it computes what a copy with those routers computes, and afterwards every
    tensor is back bit for bit, the layers left out of `weights` untouched throughout."""
    vid, net = net
    first, *rest = net.moes()
    w = torch.randn(first.gate.weight.shape, generator=torch.Generator().manual_seed(7))
    ids = random_ids(net.config.vocab_size, 2, 9, seed=6)[:, :-1]
    swapped = copy.deepcopy(net)
    with torch.no_grad():
        swapped.moes()[0].gate.weight.copy_(w)
        want = swapped(ids)
    before = state(net)
    with torch.no_grad(), testbed.router_weights(net, {first.layer: w}):
        assert torch.equal(first.gate.weight, w.to(first.gate.weight.dtype))
        assert all(torch.equal(m.gate.weight, before[f"model.layers.{m.layer}.mlp.gate.weight"]) for m in rest)
        got = net(ids)
    assert_close(got, want, atol=1e-5, msg="logits with the routers swapped in vs a copy with those routers")
    assert not torch.equal(got, net(ids).detach())  # the swapped router did change the output
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # restored
