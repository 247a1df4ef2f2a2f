"""Tiny random MoE checkpoints built with transformers, the independent oracle for model.py.

Every test that needs weights builds them here: a three-layer model per architecture, weights
drawn so that each part of the forward matters (norm weights away from 1, biases and the
DeepSeek-V3 correction bias non-zero), saved by transformers' own `save_pretrained`, so the
files have exactly the hub's disk layout (transformers 5 fuses experts in memory but its
save_pretrained writes the per-expert names of the hub files, Mixtral's block_sparse_moe w1/w2/w3 included). Helpers to rewrite a saved checkpoint into
the older hub forms (legacy config keys, FP8 block-quantised weights, an MTP layer) live here
too, so other test files reuse one definition. Leaves out bf16: parity is checked in fp32
(in bf16 a tiny numeric difference flips which expert wins at a few positions, so bf16
comparisons are all-or-nothing per token).
"""

import copy
import json
import math
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# ---------------------------------------------------------------- architectures

# Small but not degenerate: hidden 64, 4 heads, 3 layers, 8-16 experts, sizes that differ from
# each other so that a transposed or swapped tensor fails the shape check instead of passing.
_COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCH_DEFAULTS = {
    "deepseek_v2": dict(
        num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rms_norm_eps=1e-6, scoring_func="softmax",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "deepseek_v3": dict(
        num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rms_norm_eps=1e-6, scoring_func="sigmoid", topk_method="noaux_tc",
        rope_parameters=None),  # filled with yarn(1.0, 1.0) below, as in DeepSeek-V3
    "qwen2_moe": dict(
        num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, decoder_sparse_step=1, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3_moe": dict(
        num_key_value_heads=2, head_dim=32, intermediate_size=96, moe_intermediate_size=32,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "olmoe": dict(
        num_key_value_heads=4, intermediate_size=32, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mixtral": dict(
        num_key_value_heads=2, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def yarn(mscale, mscale_all_dim, factor=40.0, original=32):
    """YaRN rope parameters as transformers 5 writes them. With qk_rope_head_dim 8 and a short
    original context the YaRN ramp keeps the high frequencies, divides the low ones by `factor`, and
    blends those in between."""
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
            "original_max_position_embeddings": original, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": mscale, "mscale_all_dim": mscale_all_dim}


ARCH_DEFAULTS["deepseek_v3"]["rope_parameters"] = yarn(1.0, 1.0)

# (test id, model_type, config overrides): one entry per routing or attention variant that a
# loader could get wrong, each named after the mistake it is there to catch.
ARCH_VARIANTS = [
    ("ds2-mla-greedy", "deepseek_v2", {}),
    ("ds2-mla-qlora", "deepseek_v2", {"q_lora_rank": 24}),
    ("ds2-group-limited", "deepseek_v2", dict(
        q_lora_rank=24, topk_method="group_limited_greedy", n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    # transformers ignores norm_topk_prob for deepseek_v2; the hub's remote code does not.
    ("ds2-norm-topk-ignored", "deepseek_v2", {"norm_topk_prob": True, "routed_scaling_factor": 2.0}),
    ("ds2-yarn", "deepseek_v2", {"rope_parameters": yarn(0.707, 0.707)}),
    # mscale != mscale_all_dim: cos/sin carry the attention factor mscale(f, m) / mscale(f, m_all) != 1.
    ("ds2-yarn-mscale-differs", "deepseek_v2", {"rope_parameters": yarn(1.0, 0.707)}),
    ("ds3-noaux-norm", "deepseek_v3", {"norm_topk_prob": True}),
    ("ds3-noaux-nonorm", "deepseek_v3", {"norm_topk_prob": False}),
    ("qwen2-sparse-step2", "qwen2_moe", {"decoder_sparse_step": 2, "num_hidden_layers": 4}),
    ("qwen2-mlp-only", "qwen2_moe", {"mlp_only_layers": [1]}),
    ("qwen2-norm-topk", "qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3-gqa-headdim", "qwen3_moe", {}),
    ("olmoe", "olmoe", {}),
    ("olmoe-clip-qkv", "olmoe", {"clip_qkv": 1.5}),
    ("mixtral-gqa", "mixtral", {}),
]
VARIANT_IDS = [vid for vid, _, _ in ARCH_VARIANTS]
VARIANTS = {vid: (arch, overrides) for vid, arch, overrides in ARCH_VARIANTS}

# ---------------------------------------------------------------- the small default-like base (testbed.py, train.py)

# a base model "built the same way" as the default (testbed.DEFAULT_BASE), only smaller
SMALL_BASE = dict(hidden_size=32, num_hidden_layers=3, intermediate_size=48, num_attention_heads=2,
                  num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
# `python train.py --base-only` (and train.py when it builds the base) with these flags pretrains SMALL_BASE in seconds
# on the CPU on every machine: the tests compare runs with each other and with CPU references (a CUDA
# run is a test of its own in test_train.py)
SMALL_RUN = ["--vocab-size", "320", "--batch-size", "4", "--pretrain-batch-size", "4", "--seq-len", "32", "--eval-windows", "4",
             "--pretrain-steps", "4", "--base-overrides", json.dumps(SMALL_BASE), "--seed", "0", "--device", "cpu"]


def finetune_args(corpus, out, *extra):
    """train.py flags for a short ReMoE run of OUT/base (a copy of the small base model) on `corpus`,
    saving its state after every step."""
    return ["--model", str(out / "base"), "--data", str(corpus), "--out", str(out),
            "--stage-steps", "3,1,2", "--save-every", "1", "--batch-size", "4", "--seq-len", "32",
            "--eval-windows", "4", "--seed", "0", "--device", "cpu", *extra]

# ---------------------------------------------------------------- building checkpoints


def tiny_config(arch, **overrides):
    """The transformers config object for a tiny model of `arch`, eager everywhere (transformers 5.23
    defaults to sdpa attention and grouped_mm experts, which round differently)."""
    from transformers import AutoConfig

    # deep copies: transformers may edit rope_parameters in place, and these tables are shared
    kwargs = copy.deepcopy({**_COMMON, **ARCH_DEFAULTS[arch], **overrides})
    rope = kwargs.get("rope_parameters")
    if rope and rope.get("rope_type") == "yarn" and "max_position_embeddings" not in overrides:
        # consistent with the factor, so transformers does not warn about the implicit factor
        kwargs["max_position_embeddings"] = int(rope["factor"] * rope["original_max_position_embeddings"])
    config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize_(model, seed):
    """Draw weights so that every term of the forward shows in the logits: linear weights
    N(0, 1/fan_in), embeddings N(0, 1), norm weights 1+0.2·N, biases 0.1·N (so every norm, bias and head shows in the logits), and a
    DeepSeek-V3 correction bias shifted negative, so that selection differs from the unbiased
    scores and masking dropped groups with 0.0 instead of -inf would pick different experts."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for name, p in sorted(model.named_parameters()):
        if p.ndim >= 2:
            scale = 1.0 if name.endswith("embed_tokens.weight") else 1.0 / math.sqrt(p.shape[-1])
            p.copy_(normal(p.shape) * scale)
        elif name.endswith("bias"):
            p.copy_(0.1 * normal(p.shape))
        elif "norm" in name:
            p.copy_(1.0 + 0.2 * normal(p.shape))
        else:
            raise AssertionError(f"randomize_: no rule for 1-D parameter {name}")
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(-0.6 + 0.3 * normal(b.shape))


def make_checkpoint(path, arch, seed=0, max_shard_size=None, **overrides):
    """Build a tiny random transformers model of `arch` and save it with `save_pretrained`.
    Returns `(hf_model, path)`; the model stays in memory, eager and in eval mode, as the oracle."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)  # transformers' own init uses the global generator; we overwrite it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="eager",
                                             experts_implementation="eager")
    randomize_(model, seed)
    model.eval()
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **save_kwargs)
    return model, path


def load_oracle(path):
    """transformers' eager model read back from a folder (for checkpoints we rewrote on disk)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager",
                                                 experts_implementation="eager")
    return model.eval()


def moe_layer_ids(hf_model):
    """Decoder layers whose MLP is routed, read from the transformers module tree."""
    return [i for i, layer in enumerate(hf_model.model.layers) if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def hf_routing(hf_model, input_ids):
    """Run transformers and record each router's output by forward hooks on `mlp.gate`, which in
    5.23 returns `(router_logits, weights, indices)` for every architecture here, each [B·T, ·]
    (router logits in fp32 for DeepSeek, in model dtype for the others). Returns (logits, {layer:
    (router_logits, weights, indices)})."""
    records, handles = {}, []
    for i in moe_layer_ids(hf_model):
        def hook(_module, _inputs, output, i=i):
            records[i] = tuple(t.detach().clone() for t in output)
        handles.append(hf_model.model.layers[i].mlp.gate.register_forward_hook(hook))
    try:
        logits = hf_model(input_ids=input_ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, records


# ---------------------------------------------------------------- checkpoint rewriting


def read_tensors(path):
    """All tensors of a saved checkpoint (single file or sharded), keyed by disk name."""
    path = str(path)
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    tensors = {}
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def write_checkpoint(path, tensors, config):
    """Write one `model.safetensors` plus `config.json` into `path` (created if needed)."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def read_config(path):
    with open(os.path.join(str(path), "config.json")) as f:
        return json.load(f)


def write_config(path, config):
    with open(os.path.join(str(path), "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def to_legacy_config(config):
    """Rewrite a transformers-5 config.json dict into the key names of the hub files:
    top-level `rope_theta`, `rope_scaling` with the old `type` key, `torch_dtype`, qwen3's
    `num_experts`, no derived `head_dim`/`qk_head_dim` for DeepSeek, no filled-in defaults."""
    cfg = dict(config)
    arch = cfg["model_type"]
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    rope.pop("type", None)
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if arch == "qwen3_moe" and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if arch in ("deepseek_v2", "deepseek_v3"):
        cfg.pop("head_dim", None)
        cfg.pop("qk_head_dim", None)
    if arch == "deepseek_v3":
        cfg.pop("rope_interleave", None)
    if arch == "mixtral" and cfg.get("head_dim") is None:
        cfg.pop("head_dim", None)
    if arch == "qwen2_moe":
        # The hub file keeps a window size while sliding is off; transformers 5 writes 0 instead.
        cfg.pop("layer_types", None)
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = 8
    cfg["transformers_version"] = "4.46.0"
    return cfg


# ---------------------------------------------------------------- FP8 (DeepSeek-V3 format)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8_WEIGHT = re.compile(r"\.(self_attn|mlp)\..*(proj|proj_with_mqa)\.weight$")


def is_fp8_weight(name):
    """Attention and MLP/expert projections are stored FP8 in DeepSeek-V3; router, norms,
    embeddings and lm_head are not."""
    return bool(_FP8_WEIGHT.search(name))


def quantize_fp8(weight, block):
    """Block-quantise a 2-D weight to float8_e4m3fn with one fp32 `weight_scale_inv` per block,
    partial edge blocks included. Returns (w_fp8, scale_inv, dequantized) with
    dequantized[i, j] = w_fp8[i, j] * scale_inv[i // bo, j // bi], DeepSeek-V3's format (128 x 128 blocks)."""
    bo, bi = block
    out_f, in_f = weight.shape
    rows, cols = math.ceil(out_f / bo), math.ceil(in_f / bi)
    scale_inv = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            amax = weight[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].abs().max()
            scale_inv[r, c] = torch.clamp(amax, min=1e-12) / FP8_MAX
    expanded = scale_inv.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out_f, :in_f]
    w_fp8 = (weight / expanded).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w_fp8, scale_inv, w_fp8.to(torch.float32) * expanded


def mtp_layer_tensors(tensors, config):
    """Tensors of a DeepSeek-V3 multi-token-prediction module stored as layer `num_hidden_layers`
    (layer 61 in the real model): a copy of the last decoder layer plus the MTP-only leaves (enorm, hnorm,
    eh_proj, shared_head, embed_tokens). transformers ignores them on load, and so must a loader."""
    n = config["num_hidden_layers"]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    last = f"model.layers.{n - 1}."
    extra = {f"model.layers.{n}." + k[len(last):]: v.clone()
             for k, v in tensors.items() if k.startswith(last)}
    extra[f"model.layers.{n}.enorm.weight"] = torch.ones(hidden)
    extra[f"model.layers.{n}.hnorm.weight"] = torch.ones(hidden)
    extra[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(hidden, 2 * hidden)
    extra[f"model.layers.{n}.shared_head.norm.weight"] = torch.ones(hidden)
    extra[f"model.layers.{n}.shared_head.head.weight"] = torch.zeros(vocab, hidden)
    extra[f"model.layers.{n}.embed_tokens.weight"] = torch.zeros(vocab, hidden)
    return extra


def write_fp8_checkpoint(src, dst_fp8, dst_dequant, block_size=(128, 128), write_block_size=True,
                         with_mtp=True):
    """From a float32 deepseek_v3 checkpoint, write (a) its FP8 block-quantised form with a
    `quantization_config` as in the hub file (and optionally an MTP layer), and (b) the same
    weights dequantized back to float32 with a plain config, for the transformers oracle."""
    tensors = read_tensors(src)
    config = read_config(src)
    fp8, dequant = {}, {}
    for name, t in tensors.items():
        if is_fp8_weight(name):
            w8, s, w = quantize_fp8(t, block_size)
            fp8[name], fp8[name + "_scale_inv"] = w8, s
            dequant[name] = w
        else:
            fp8[name] = dequant[name] = t
    if with_mtp:
        mtp = mtp_layer_tensors(tensors, config)
        for name, t in mtp.items():
            if is_fp8_weight(name):
                w8, s, _ = quantize_fp8(t, block_size)
                fp8[name], fp8[name + "_scale_inv"] = w8, s
            else:
                fp8[name] = t
    qconfig = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
    if write_block_size:
        qconfig["weight_block_size"] = list(block_size)
    fp8_config = dict(config, quantization_config=qconfig, num_nextn_predict_layers=1)
    write_checkpoint(dst_fp8, fp8, fp8_config)
    write_checkpoint(dst_dequant, dequant, config)


# ---------------------------------------------------------------- comparisons


def assert_close(actual, expected, atol, msg=""):
    """Max-abs comparison that says by how much it failed (max and mean abs error), since a
    1e-3 miss and a 4.0 miss point at different bugs. atol=0 demands equality."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    max_err = err.max().item() if err.numel() else 0.0
    if not max_err <= atol:
        worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0]) if err.numel() else ()
        raise AssertionError(
            f"{msg}: max abs err {max_err:.3e} (at {worst}), mean abs err {err.mean().item():.3e}, "
            f"atol {atol:.1e}, |expected| max {expected.abs().max().item():.3f}")


def random_ids(vocab_size, batch, length, seed=0):
    """Deterministic random token ids, independent of the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen)


def assert_cli_errors(script, cases, cwd, extra=()):
    """Run `python script ARGS` for every case {name: (args, text)} side by side; each must exit 2 with
    exactly one stderr line `error: ...` containing `text`, and no traceback."""
    import subprocess
    import sys

    procs = {name: subprocess.Popen([sys.executable, str(script), *argv, *extra], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=cwd)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, err)
