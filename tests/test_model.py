"""model.py against transformers 5.23 (eager attention, eager experts) as the independent oracle.

What is checked, per architecture variant of `tiny.ARCH_VARIANTS` (tiny random checkpoints saved
by transformers itself): fp32 logits, the expert sets each token is routed to, the routing
weights recomputed from the returned scores, KV-cache decoding, greedy generation, sharded and
legacy-keyed checkpoints, config field names. Then the published configs' parameter totals
(the published totals recomputed from the configs), DeepSeek-V3 FP8 block-scaled weights, loading without routed experts, the tokenizer,
and one-line errors for broken checkpoints (library and CLI). Leaves out bf16 parity (
routing flips make bf16 comparisons all-or-nothing per token) and GPU.

Run: python -m pytest -q tests/test_model.py
"""

import copy
import json
import os
import re
import runpy
import shutil
import struct
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.utils._python_dispatch

import checkpoint
import cli
import model as remoe
from tiny import (VARIANT_IDS, assert_close, hf_routing, load_oracle,
                  moe_layer_ids, random_ids, read_config, read_tensors, to_legacy_config,
                  write_checkpoint, write_config, write_fp8_checkpoint, make_checkpoint)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_PY = os.path.join(REPO_ROOT, "checkpoint.py")
CONFIGS_DIR = os.path.join(REPO_ROOT, "tests", "configs")

# fp32 tolerances: transformers' own fp32 code paths (eager vs sdpa attention, eager vs grouped_mm experts)
# agree with each other within 6e-6 at |logits| ~ 4 on these tiny models; the
# KV cache only changes matmul shapes, so it must agree tighter than a re-implementation.
LOGITS_ATOL = 1e-4
CACHE_ATOL = 1e-5
# Same weights, same config semantics: the tensors must be bit-equal. Their logits are compared
# after moving both models' weights into fresh allocations: the loads leave the weights as views
# of memory-mapped files at different byte alignments, and CPU matmul kernels pick their SIMD path
# by alignment, which reorders float sums (a 1.4e-6 logit difference was seen on one machine, none
# on another). With the bytes in equally aligned memory the two computations are the same, so the
# logits must then be bit-identical on any machine and thread count.
WEIGHTS_ATOL = 1e-5
BATCH, SEQ = 2, 32

variants = pytest.mark.parametrize("vid", VARIANT_IDS)


def ids_for(hf_model, seed=0, batch=BATCH, length=SEQ):
    return random_ids(hf_model.config.vocab_size, batch, length, seed=seed)


def expert_count(config_dict):
    """The routed-expert count whatever the file calls it: the first present of n_routed_experts (DeepSeek),
    num_experts (Qwen, OLMoE) and num_local_experts (Mixtral; transformers 5 also writes it for Qwen3)."""
    for key in ("n_routed_experts", "num_experts", "num_local_experts"):
        if config_dict.get(key) is not None:
            return config_dict[key]
    raise KeyError("no expert count key")


# ---------------------------------------------------------------- parity with transformers


@variants
@torch.no_grad()
def test_logits_match_transformers(vid, tiny, loaded):
    hf, _ = tiny(vid)
    ids = ids_for(hf)
    ours = loaded(vid)(ids)
    assert ours.shape == (BATCH, SEQ, hf.config.vocab_size)
    assert ours.dtype == torch.float32
    assert_close(ours, hf(ids).logits, LOGITS_ATOL, f"{vid} logits")


@variants
@torch.no_grad()
def test_routing_matches_transformers(vid, tiny, loaded):
    """Same expert SET per token in every MoE layer (slot order is free: DeepSeek uses
    topk(sorted=False)), and the same weight for each chosen expert."""
    hf, _ = tiny(vid)
    net = loaded(vid)
    ids = ids_for(hf, seed=1)
    hf_logits, oracle = hf_routing(hf, ids)
    logits, routing = net(ids, return_routing=True)
    assert_close(logits, hf_logits, LOGITS_ATOL, f"{vid} logits with return_routing")
    assert_close(logits, net(ids), 0.0, f"{vid} return_routing changes the logits")

    assert [r.layer for r in routing] == moe_layer_ids(hf) == list(net.config.moe_layers)
    for r in routing:
        _, hf_w, hf_idx = oracle[r.layer]
        k = hf_idx.shape[-1]
        idx = r.indices.reshape(-1, k)
        w = r.weights.reshape(-1, k)
        ours_sorted, ours_order = idx.sort(-1)
        hf_sorted, hf_order = hf_idx.sort(-1)
        differ = (ours_sorted != hf_sorted).any(-1)
        assert not differ.any(), (
            f"{vid} layer {r.layer}: expert sets differ at {int(differ.sum())}/{len(differ)} tokens, "
            f"first at token {int(differ.nonzero()[0])}: ours {ours_sorted[differ][0].tolist()} "
            f"vs transformers {hf_sorted[differ][0].tolist()}")
        assert_close(w.gather(-1, ours_order), hf_w.float().gather(-1, hf_order), WEIGHTS_ATOL,
                     f"{vid} layer {r.layer} routing weights")


def expected_weights(hf_config, scores, indices):
    """Routing weights from the full scores, as each architecture's math says: the scores of the chosen experts
    (softmax, or sigmoid for DeepSeek-V3), renormalised to sum 1 where norm_topk_prob applies (never for
    deepseek_v2 in transformers), times routed_scaling_factor."""
    arch = hf_config.model_type
    picked = scores.gather(-1, indices)
    if arch == "deepseek_v2":  # transformers never normalises here, whatever norm_topk_prob says
        return picked * hf_config.routed_scaling_factor
    if arch == "deepseek_v3":
        if hf_config.norm_topk_prob:
            picked = picked / (picked.sum(-1, keepdim=True) + 1e-20)
        return picked * hf_config.routed_scaling_factor
    if arch == "mixtral" or hf_config.norm_topk_prob:
        return picked / picked.sum(-1, keepdim=True)
    return picked


@variants
@torch.no_grad()
def test_routing_shapes_and_weights_follow_scores(vid, tiny, loaded):
    """Routing is returned explicitly (style habit 6); its weights must be derivable from its
    scores, and the scores must be the router's activation of transformers' router logits."""
    hf, _ = tiny(vid)
    net = loaded(vid)
    ids = ids_for(hf, seed=2)
    _, oracle = hf_routing(hf, ids)
    _, routing = net(ids, return_routing=True)
    cfg = hf.config
    k, n_exp = cfg.num_experts_per_tok, expert_count(read_config(tiny(vid)[1]))
    assert len(routing) == len(moe_layer_ids(hf))
    for r in routing:
        assert type(r).__name__ == "Routing" and r._fields == ("layer", "indices", "weights", "scores")
        assert isinstance(r.layer, int)
        assert r.indices.shape == (BATCH, SEQ, k) and r.indices.dtype == torch.long
        assert r.weights.shape == (BATCH, SEQ, k)
        assert r.scores.shape == (BATCH, SEQ, n_exp)
        assert int(r.indices.min()) >= 0 and int(r.indices.max()) < n_exp
        assert (r.indices.sort(-1).values.diff(dim=-1) != 0).all(), "an expert chosen twice"
        scores = r.scores.float()
        router_logits = oracle[r.layer][0].float().reshape(BATCH, SEQ, n_exp)
        if cfg.model_type == "deepseek_v3":  # sigmoid, before the correction bias
            assert_close(scores, router_logits.sigmoid(), WEIGHTS_ATOL, f"{vid} L{r.layer} scores")
        else:
            assert_close(scores, router_logits.softmax(-1), WEIGHTS_ATOL, f"{vid} L{r.layer} scores")
        assert_close(r.weights.float(), expected_weights(cfg, scores, r.indices), WEIGHTS_ATOL,
                     f"{vid} L{r.layer} weights from scores")
        grouped = cfg.model_type == "deepseek_v3" or getattr(cfg, "topk_method", "greedy") != "greedy"
        if grouped:  # all chosen experts lie in at most topk_group of the n_group groups
            groups = r.indices // (n_exp // cfg.n_group)
            n_groups_used = torch.tensor([len(set(g.tolist())) for g in groups.reshape(-1, k)])
            assert int(n_groups_used.max()) <= cfg.topk_group
        else:  # plain top-k: every chosen score >= every unchosen one
            picked_min = scores.gather(-1, r.indices).min(-1).values
            rest = scores.scatter(-1, r.indices, float("-inf")).max(-1).values
            assert (picked_min >= rest).all()


# ---------------------------------------------------------------- the grouped MoE dispatch


def set_grouped(net, grouped, padded=None):
    for moe in net.moes():
        moe.experts.grouped, moe.experts.padded = grouped, padded


@variants
def test_grouped_dispatch_equals_reference_loop(vid, tiny, loaded):
    """Several tokens take the grouped path (pairs sorted by expert once, then one padded batched SwiGLU, or
    each expert on its slice); both must compute what the reference loop over experts computes, logits and
    every parameter's gradient, within float32 rounding: the same products, summed in another order (1e-5 of
    the largest value)."""
    net = copy.deepcopy(loaded(vid))
    for p in net.parameters():
        p.requires_grad_(True)
    ids = ids_for(tiny(vid)[0])
    got = {}
    for mode in ("loop", "padded", "sliced"):
        set_grouped(net, mode != "loop", mode == "padded")
        net.zero_grad()
        logits = net(ids)
        logits.square().mean().backward()
        got[mode] = [logits.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()  # unchosen experts
                                         for p in net.parameters()]
    assert any(p.grad is not None and p.grad.abs().max() > 0 for m in net.moes() for p in m.experts.parameters())
    for mode in ("padded", "sliced"):
        for i, (ref, fast) in enumerate(zip(got["loop"], got[mode])):
            assert_close(fast, ref, 1e-5 * max(ref.abs().max().item(), 1e-3), f"{vid} {mode}: tensor {i} (0 = logits)")


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make a CUDA device wait for the host to read a result back: a scalar read
    (.item(), int(t)), and ops whose output size depends on the data (nonzero, bincount, boolean masks)."""

    SYNCING = {"aten::nonzero", "aten::_local_scalar_dense", "aten::bincount", "aten::masked_select",
               "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.count = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masked = name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
        if name in self.SYNCING or masked:
            self.count[name] = self.count.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_training_step_syncs_at_most_once_per_moe_layer():
    """A training forward + backward of a default-like base model (lm + balance + reuse losses) reads at most
    one data-dependent number back per MoE layer with the grouped dispatch; the reference loop, one per
    expert, is far above that (the check can fail)."""
    import router
    from tiny import SMALL_BASE, tiny_config

    torch.manual_seed(0)
    net = checkpoint.build_model(tiny_config("deepseek_v2", **SMALL_BASE, first_k_dense_replace=0).to_dict()).train()
    with torch.no_grad():
        for p in net.parameters():  # routers included (they start uninitialised), so tokens spread over experts
            p.normal_(0.0, 0.5)
    E, L = net.config.n_routed_experts, len(net.config.moe_layers)
    ids = random_ids(160, 2, 33)

    def step():
        logits, routing = net(ids[:, :-1], return_routing=True)
        loss = (torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                + router.balance_loss(routing, E, kind="switch") + router.reuse_loss(routing))
        loss.backward()

    syncs = {}
    for mode in ("padded", "sliced", "loop"):
        set_grouped(net, mode != "loop", mode == "padded")
        with HostSyncs() as counter, mock.patch.object(torch.Tensor, "tolist", counted_tolist(counter)):
            step()
        syncs[mode] = sum(counter.count.values())
    assert syncs["padded"] <= L and syncs["sliced"] <= L, syncs
    assert syncs["loop"] > 2 * L, syncs


def counted_tolist(counter):
    """Tensor.tolist reads the values back without passing through the dispatcher: count it as one read."""
    tolist = torch.Tensor.tolist

    def spy(self):
        counter.count["tolist"] = counter.count.get("tolist", 0) + 1
        return tolist(self)
    return spy


# ---------------------------------------------------------------- incremental decoding


@variants
@pytest.mark.parametrize("chunks", [[20] + [1] * 12, [13, 11, 1, 7]], ids=["prefill+singles", "chunks"])
@torch.no_grad()
def test_kv_cache_matches_full_forward(vid, chunks, tiny, loaded):
    hf, _ = tiny(vid)
    net = loaded(vid)
    ids = ids_for(hf, seed=3)
    full = net(ids)
    cache = remoe.KVCache()
    pieces, start = [], 0
    for n in chunks:
        pieces.append(net(ids[:, start:start + n], kv_cache=cache))
        start += n
    assert start == SEQ
    assert_close(torch.cat(pieces, dim=1), full, CACHE_ATOL, f"{vid} cached {chunks}")


@variants
@torch.no_grad()
def test_static_kv_cache_matches_full_forward(vid, tiny, loaded):
    """The fixed-size cache (what a compiled decode step uses): a prefill, then single tokens, each pass
    reading all max_len positions with the not-yet-written ones masked; a few spare positions at the end."""
    hf, _ = tiny(vid)
    net = loaded(vid)
    ids = ids_for(hf, seed=3)
    full = net(ids)
    cache = remoe.StaticKVCache(SEQ + 5, ids.device)
    pieces, start = [], 0
    for n in [20] + [1] * (SEQ - 20):
        cache.seek(start, n)
        pieces.append(net(ids[:, start:start + n], kv_cache=cache))
        start += n
    assert_close(torch.cat(pieces, dim=1), full, CACHE_ATOL, f"{vid} static cache")
    with pytest.raises(ValueError, match="holds 37 positions"):
        cache.seek(SEQ, 6)
    cache.seek(SEQ, 1)
    with pytest.raises(ValueError, match=r"seek\(position, 2\) before a pass of 2 tokens"):
        net(ids[:, :2], kv_cache=cache)  # a pass longer than the seek announced


@variants
@torch.no_grad()
def test_greedy_generate_matches_transformers(vid, tiny, loaded):
    hf, _ = tiny(vid)
    prompt = ids_for(hf, seed=4, length=8)
    new = 20
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    got = remoe.generate(loaded(vid), prompt, new)
    assert got.shape == (BATCH, 8 + new) and got.dtype == torch.long
    assert torch.equal(got[:, :8], prompt)
    assert torch.equal(got, expected), f"{vid}:\nours {got[:, 8:].tolist()}\nhf   {expected[:, 8:].tolist()}"


# ---------------------------------------------------------------- checkpoint forms


def rehome_(net):
    """Move every parameter and buffer into a fresh allocation (the same values, default alignment)."""
    for module in net.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            t.data = t.data.clone()
    return net


def assert_same_model(net, reference, ids, msg):
    """Two loads of the same weights: bit-equal tensors, and bit-identical logits once both sit in
    equally aligned memory (see the note at the top)."""
    ours, ref = net.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(ref), msg
    differ = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not differ, f"{msg}: tensors differ: {differ[:5]}"
    reference = copy.deepcopy(reference)  # the session's shared model stays as loaded
    assert_close(rehome_(net)(ids), rehome_(reference)(ids), 0.0, msg)


@variants
@torch.no_grad()
def test_sharded_checkpoint_loads_identically(vid, tiny, loaded, tmp_path):
    """Shards are found through the index's weight_map only: the files are renamed to DeepSeek's
    6-digit total (model-00001-of-000004), which no loader could derive from transformers' 5-digit one."""
    hf, _ = tiny(vid)
    hf.save_pretrained(str(tmp_path), max_shard_size="64KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    renamed = {old: f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors" for i, old in enumerate(shards)}
    for old, new in renamed.items():
        os.rename(tmp_path / old, tmp_path / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    net = checkpoint.load_model(str(tmp_path))
    ids = ids_for(hf, seed=5)
    assert_same_model(net, loaded(vid), ids, f"{vid} sharded vs single file")


def legacy_copy(src, dst, edit=None):
    """A copy of checkpoint `src` whose config.json uses the hub's legacy keys (tiny.to_legacy_config)."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    cfg = to_legacy_config(read_config(src))
    if edit:
        edit(cfg)
    write_config(dst, cfg)
    return cfg


@variants
@torch.no_grad()
def test_legacy_config_loads_identically(vid, tiny, loaded, tmp_path):
    hf, path = tiny(vid)
    cfg = legacy_copy(str(path), str(tmp_path))
    assert "rope_parameters" not in cfg and "dtype" not in cfg
    net = checkpoint.load_model(str(tmp_path))
    ids = ids_for(hf, seed=6)
    assert_same_model(net, loaded(vid), ids, f"{vid} legacy config vs transformers-5 config")
    for field in ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "moe_layers"):
        assert getattr(net.config, field) == getattr(loaded(vid).config, field), field


@pytest.mark.parametrize("vid", ["mixtral-gqa", "olmoe"])
@torch.no_grad()
def test_missing_rope_theta_uses_class_default(vid, tiny, loaded, tmp_path):
    """A config without rope_theta gets the class default: 1e6 for Mixtral, 1e4 otherwise (transformers' class defaults);
    the tiny Mixtral and OLMoE were built with exactly those values."""
    hf, path = tiny(vid)
    legacy_copy(str(path), str(tmp_path), edit=lambda c: c.pop("rope_theta"))
    net = checkpoint.load_model(str(tmp_path))
    ids = ids_for(hf, seed=7)
    assert_same_model(net, loaded(vid), ids, f"{vid} default rope_theta")


@variants
def test_config_exposes_standard_names(vid, tiny, loaded):
    """One set of field names whatever the file said (qwen `num_experts`, qwen3-in-transformers-5
    `num_local_experts`, mixtral `num_local_experts`)."""
    hf, path = tiny(vid)
    disk = read_config(path)
    c = loaded(vid).config
    assert c.model_type == disk["model_type"]
    assert c.num_hidden_layers == disk["num_hidden_layers"]
    assert c.n_routed_experts == expert_count(disk)
    assert c.num_experts_per_tok == disk["num_experts_per_tok"]
    assert c.vocab_size == disk["vocab_size"]
    assert c.hidden_size == disk["hidden_size"]
    assert list(c.moe_layers) == moe_layer_ids(hf)


@variants
def test_module_names_follow_checkpoint(vid, tiny, loaded):
    """Routed experts and routers sit where offloading code will look for them, holding the
    tensors of the file (Mixtral's w1/w3/w2 are gate/up/down, under block_sparse_moe on disk)."""
    _, path = tiny(vid)
    disk = read_tensors(path)
    net = loaded(vid)
    mixtral = net.config.model_type == "mixtral"
    for layer in net.config.moe_layers:
        mlp = net.model.layers[layer].mlp
        block = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}"
        assert torch.equal(mlp.gate.weight, disk[f"{block}.gate.weight"])
        assert len(mlp.experts) == net.config.n_routed_experts
        for e in (0, net.config.n_routed_experts - 1):
            for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                key = f"{block}.experts.{e}.{theirs if mixtral else ours}.weight"
                linear = getattr(mlp.experts[e], ours)
                assert isinstance(linear, torch.nn.Linear)
                assert torch.equal(linear.weight, disk[key]), key


# ---------------------------------------------------------------- published configs

# Parameter totals of the published models: sum(p.numel()) of transformers 5.23 built on the meta device
# from tests/configs (which matches the published figures, e.g. V2-Lite's checkpoint dump of
# 15,706,484,224; DeepSeek-V3 without its multi-token-prediction layer), with each model's layer
# count, routed-expert count, top-k and number of MoE layers from the same configs.
PUBLISHED = {
    "DeepSeek-V2-Lite": (15_706_484_224, 27, 64, 6, 26),
    "DeepSeek-V2": (235_741_434_880, 60, 160, 6, 59),
    "DeepSeek-V3": (671_026_404_352, 61, 256, 8, 58),
    "Qwen1.5-MoE-A2.7B": (14_315_784_192, 24, 60, 4, 24),
    "Qwen3-30B-A3B": (30_532_122_624, 48, 128, 8, 48),
    "OLMoE-1B-7B-0924": (6_919_161_856, 16, 64, 8, 16),
    "Mixtral-8x7B-v0.1": (46_702_792_704, 32, 8, 2, 32),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_parameter_count(name, monkeypatch):
    """Counts only: the random init of 45k meta-device Linears (DeepSeek-V3) is half the build
    time and produces nothing, so it is switched off here."""
    total, layers, experts, top_k, n_moe = PUBLISHED[name]
    with open(os.path.join(CONFIGS_DIR, f"{name}.json")) as f:
        config = json.load(f)
    for cls in (torch.nn.Linear, torch.nn.Embedding):
        monkeypatch.setattr(cls, "reset_parameters", lambda self: None)
    with torch.device("meta"):
        net = checkpoint.build_model(config)
    assert sum(p.numel() for p in net.parameters()) == total
    c = net.config
    assert (c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (layers, experts, top_k)
    assert len(c.moe_layers) == n_moe and list(c.moe_layers) == list(range(layers - n_moe, layers))


# ---------------------------------------------------------------- DeepSeek-V3 FP8


@pytest.fixture(scope="session")
def fp8_base(tmp_path_factory):
    """A tiny deepseek_v3 whose sizes are not multiples of 16 (q_lora_rank 24, kv_a 16+8 rows,
    expert width 24, dense width 40), so 16x16 blocks include partial edge blocks."""
    path = tmp_path_factory.mktemp("ds3-fp8-base")
    make_checkpoint(path, "deepseek_v3", seed=11, q_lora_rank=24, moe_intermediate_size=24,
                    intermediate_size=40)
    return path


@pytest.mark.parametrize("block,write_block", [((16, 16), True), ((128, 128), False)],
                         ids=["block16-from-config", "default-block128"])
@torch.no_grad()
def test_fp8_checkpoint_matches_dequantized_oracle(block, write_block, fp8_base, tmp_path):
    """Weights are float8_e4m3fn with `weight_scale_inv` per block (block size from
    quantization_config.weight_block_size, default 128x128), plus an MTP layer stored as layer
    num_hidden_layers that must be skipped. Oracle: transformers on the dequantized weights."""
    fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "dequant"
    write_fp8_checkpoint(str(fp8_base), str(fp8_dir), str(deq_dir), block_size=block,
                         write_block_size=write_block, with_mtp=True)
    oracle = load_oracle(deq_dir)
    net = checkpoint.load_model(str(fp8_dir))
    ids = random_ids(oracle.config.vocab_size, BATCH, SEQ, seed=8)
    assert_close(net(ids), oracle(ids).logits, LOGITS_ATOL, f"fp8 {block}")
    assert len(net.model.layers) == oracle.config.num_hidden_layers
    dequant = read_tensors(deq_dir)
    layer = net.config.moe_layers[-1]
    for e in (0, net.config.n_routed_experts - 1):
        key = f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"
        got = net.model.layers[layer].mlp.experts[e].down_proj.weight
        assert got.dtype == torch.float32
        assert_close(got, dequant[key], 1e-6, key)


# ---------------------------------------------------------------- experts on disk


@variants
def test_experts_on_disk_loads_everything_but_routed_experts(vid, tiny, loaded):
    _, path = tiny(vid)
    full = loaded(vid)
    lean = checkpoint.load_model(str(path), experts_on_disk=True)
    for layer in lean.config.moe_layers:
        experts = getattr(lean.model.layers[layer].mlp, "experts", None)
        assert experts is None or len(experts) == 0, f"layer {layer} still holds routed experts"
    full_sd, lean_sd = full.state_dict(), lean.state_dict()
    assert not [k for k in lean_sd if ".experts." in k]
    wanted = [k for k in full_sd if ".experts." not in k]
    missing = [k for k in wanted if k not in lean_sd]
    assert not missing, f"not loaded with experts_on_disk: {missing[:5]}"
    for k in wanted:
        assert lean_sd[k].device.type != "meta", k
        assert torch.equal(lean_sd[k], full_sd[k]), k


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_returned_when_present(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    _, path = tiny("mixtral-gqa")
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(path, folder)
    tok.save(str(folder / "tokenizer.json"))
    got = checkpoint.load_tokenizer(str(folder))
    assert isinstance(got, Tokenizer)
    assert got.encode("hello world").ids == [1, 2]
    assert checkpoint.load_tokenizer(str(path)) is None


# ---------------------------------------------------------------- bad input

SUPPORTED = ["deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral"]
BAD_BASE = "qwen3-gqa-headdim"  # disk names equal module names, so messages are unambiguous
WRONG_SHAPE_KEY = "model.layers.1.mlp.gate.weight"  # [16, 64] on disk -> rewritten [16, 63]
MISSING_KEY = "model.layers.2.mlp.experts.5.down_proj.weight"
UNEXPECTED_KEY = "model.layers.0.self_attn.bogus_proj.weight"
ODD_KEY = "model.layers.extra.weight"


def shape(*dims):
    """Message fragment matcher for a shape, whichever way it is printed: (16, 64), [16, 64],
    torch.Size([16, 64]), 16x64."""
    return re.compile(r"(?<!\d)" + r"\D{1,4}".join(str(d) for d in dims) + r"(?!\d)")


@pytest.fixture(scope="session")
def bad_checkpoints(tiny, tmp_path_factory):
    """Broken copies of one tiny checkpoint: case -> (path, fragments the one-line message must
    contain: strings, or compiled patterns for shapes)."""
    hf, good = tiny(BAD_BASE)
    root = tmp_path_factory.mktemp("bad")
    cases = {}

    def clone(name):
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    cases["missing-folder"] = (root / "no-such-folder", ["no-such-folder"])

    d = root / "no-config"
    d.mkdir()
    shutil.copy(good / "model.safetensors", d / "model.safetensors")
    cases["no-config"] = (d, ["no-config", "config.json"])

    d = clone("unsupported-type")
    cfg = read_config(d)
    cfg["model_type"] = "llama"
    write_config(d, cfg)
    cases["unsupported-type"] = (d, ["llama"] + SUPPORTED)

    d = root / "missing-shard"
    hf.save_pretrained(str(d), max_shard_size="64KB")
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    os.remove(d / shard)
    cases["missing-shard"] = (d, [shard])

    d = clone("truncated")
    size = os.path.getsize(d / "model.safetensors")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(int(size * 0.6))
    cases["truncated"] = (d, ["model.safetensors"])

    d = clone("corrupt-header")
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(8)  # the JSON header starts after its 8-byte length
        f.write(b"#not json at all#")
    cases["corrupt-header"] = (d, ["model.safetensors"])

    # headers that parse but break the format: the tensors' byte ranges must tile the data in order
    # (each begins where the previous ended), each as long as dtype x shape, all inside the file
    def edit_header(name, edit, fragments):
        d = clone(name)
        raw = (d / "model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        text = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        cases[name] = (d, ["model.safetensors", *fragments])

    def by_offset(header):
        return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])

    def shift(header, k, delta):
        header[k]["data_offsets"] = [o + delta for o in header[k]["data_offsets"]]
        return header

    edit_header("negative-offsets", lambda h: shift(h, by_offset(h)[0], -8), ["data_offsets"])
    edit_header("overlapping-offsets", lambda h: shift(h, by_offset(h)[3], -4), ["overlaps"])
    edit_header("gap-in-offsets", lambda h: shift(h, by_offset(h)[3], 4), ["gap"])
    edit_header("header-not-an-object", lambda h: list(h), ["list"])
    edit_header("non-integer-shape", lambda h: {**h, WRONG_SHAPE_KEY: {**h[WRONG_SHAPE_KEY], "shape": [16.0, "64"]}},
                [WRONG_SHAPE_KEY, "shape"])
    edit_header("unknown-dtype", lambda h: {**h, WRONG_SHAPE_KEY: {**h[WRONG_SHAPE_KEY], "dtype": "F33"}},
                [WRONG_SHAPE_KEY, "F33"])
    d = clone("huge-header-length")
    with open(d / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 2**63))
    cases["huge-header-length"] = (d, ["model.safetensors", "header"])

    tensors = read_tensors(good)
    config = read_config(good)
    assert tuple(tensors[WRONG_SHAPE_KEY].shape) == (16, 64)
    wrong = dict(tensors)
    wrong[WRONG_SHAPE_KEY] = tensors[WRONG_SHAPE_KEY][:, :63].clone()
    write_checkpoint(root / "wrong-shape", wrong, config)
    cases["wrong-shape"] = (root / "wrong-shape", [WRONG_SHAPE_KEY, shape(16, 64), shape(16, 63)])

    write_checkpoint(root / "missing-tensor", {k: v for k, v in tensors.items() if k != MISSING_KEY}, config)
    cases["missing-tensor"] = (root / "missing-tensor", [MISSING_KEY])

    write_checkpoint(root / "unexpected-tensor", dict(tensors, **{UNEXPECTED_KEY: torch.zeros(8, 64)}), config)
    cases["unexpected-tensor"] = (root / "unexpected-tensor", [UNEXPECTED_KEY])

    # a name under model.layers. whose third part is not a layer number
    write_checkpoint(root / "odd-tensor-name", dict(tensors, **{ODD_KEY: torch.zeros(4)}), config)
    cases["odd-tensor-name"] = (root / "odd-tensor-name", [ODD_KEY])

    d = root / "a-file"
    d.write_text("not a folder")
    cases["path-is-a-file"] = (d, ["a-file", "is a file"])
    return cases


BAD_CASES = ["missing-folder", "no-config", "unsupported-type", "missing-shard", "truncated",
             "corrupt-header", "negative-offsets", "overlapping-offsets", "gap-in-offsets", "header-not-an-object",
             "non-integer-shape", "unknown-dtype", "huge-header-length", "wrong-shape", "missing-tensor",
             "unexpected-tensor", "odd-tensor-name", "path-is-a-file"]


def assert_mentions(message, fragments, case):
    for frag in fragments:
        found = frag.search(message) if isinstance(frag, re.Pattern) else frag in message
        assert found, f"{case}: message does not mention {getattr(frag, 'pattern', frag)!r}: {message!r}"


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoint_raises_one_line_error(case, bad_checkpoints):
    path, fragments = bad_checkpoints[case]
    with pytest.raises(cli.UserError) as info:
        checkpoint.load_model(str(path))
    message = str(info.value)
    assert message and "\n" not in message.strip(), f"{case}: not one line: {message!r}"
    assert_mentions(message, fragments, case)


def run_cli_in_process(path, monkeypatch, capfd):
    """`python checkpoint.py --model PATH` without paying a torch import per case: the script runs as
    __main__ in this process. Any exception other than SystemExit would be a traceback."""
    monkeypatch.setattr(sys, "argv", ["checkpoint.py", "--model", str(path)])
    status, escaped = 0, None
    try:
        runpy.run_path(CHECKPOINT_PY, run_name="__main__")
    except SystemExit as done:
        if isinstance(done.code, str):  # sys.exit("...") prints the string to stderr, status 1
            sys.stderr.write(done.code + "\n")
            status = 1
        else:
            status = done.code or 0
    except Exception as e:  # what python would print as a traceback
        escaped = e
    out, err = capfd.readouterr()
    assert escaped is None, f"uncaught {type(escaped).__name__}: {escaped} (a traceback for the user)"
    return status, out, err


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_reports_bad_checkpoint_in_one_line(case, bad_checkpoints, monkeypatch, capfd):
    path, fragments = bad_checkpoints[case]
    status, out, err = run_cli_in_process(path, monkeypatch, capfd)
    assert status != 0, f"{case}: exit status 0"
    error_lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, f"{case}: expected one 'error:' line, got stdout={out!r} stderr={err!r}"
    assert "Traceback" not in err
    assert_mentions(error_lines[0], fragments, case)


def test_cli_summarises_good_checkpoint(tiny, monkeypatch, capfd):
    _, good = tiny(BAD_BASE)
    status, out, err = run_cli_in_process(good, monkeypatch, capfd)
    assert status == 0, err[-2000:]
    assert out.strip(), "no summary printed"
    assert "error:" not in out + err


def test_cli_as_a_process(bad_checkpoints):
    """Once as a real process (exit status and stderr as a shell sees them): a missing folder
    exits non-zero with one `error:` line and no traceback."""
    bad, fragments = bad_checkpoints["missing-folder"]
    done = subprocess.run([sys.executable, CHECKPOINT_PY, "--model", str(bad)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    error_lines = [l for l in (done.stdout + done.stderr).splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1, done.stderr[-2000:]
    assert_mentions(error_lines[0], fragments, "missing-folder (process)")
