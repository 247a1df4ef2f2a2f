"""
checkpoint.py: the Hugging Face checkpoint format, read and written without transformers: config.json
mapped onto model.ModelConfig by an explicit key map (legacy hub keys and transformers-5 keys, each
checked by type and range), the safetensors header checked as the format defines it, tensors
memory-mapped straight into the model (one file or the shards of an index, FP8 blocks dequantized,
every layer accounted for by the config, every weight finite), models saved in the same layout, and the
tuned checkpoint that train.py exports (the base's files with only the router tensors replaced).

    python checkpoint.py --model runs/default/base                     # summary of a checkpoint
    python checkpoint.py --model runs/default/base --prompt "def main():" --max-new-tokens 40

Follows: the safetensors format and transformers 5.23's config keys (shared/spec in the steering
notes lists them per architecture). Leaves out: writing shards, GGUF (export.py).
"""

import json
import math
import mmap
import os
import shutil
import struct
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import (DEFAULT_BASE_DIR, DEFAULT_RUN, ArgumentParser, UserError, atomic_write, check_prompt, fatal_errors,
                 user_errors)
from model import ModelConfig, Transformer, count_parameters, generate

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral")


# ----------------------------------------------------------------------------------------------
# config.json -> ModelConfig

def _first(d, *keys, default=None):
    """The value of the first key present (and not null): checkpoints name some fields differently."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


# The type and range of every key the model reads, as the format defines them; an absent or null key
# takes its default. A bool is an int in Python, so it is refused wherever a number is expected.
SIZE = (int, lambda v: v >= 1, "an integer >= 1")
COUNT = (int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = (float, lambda v: 0 < v < math.inf, "a number > 0")
NUMBER = (float, lambda v: -math.inf < v < math.inf, "a finite number")
FLAG = (bool, None, "true or false")
NAME = (str, None, "a string")
CONFIG_KEYS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "max_position_embeddings", "intermediate_size", "moe_intermediate_size", "head_dim",
                     "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group"), SIZE),
    **dict.fromkeys(("n_routed_experts", "num_experts", "num_local_experts", "num_experts_per_tok",
                     "qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace",
                     "shared_expert_intermediate_size", "decoder_sparse_step", "num_nextn_predict_layers"), COUNT),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "routed_scaling_factor", "clip_qkv"), POSITIVE),
    **dict.fromkeys(("tie_word_embeddings", "norm_topk_prob", "attention_bias", "rope_interleave", "qkv_bias"), FLAG),
    "topk_method": NAME,
}
ROPE_KEYS = {"rope_theta": POSITIVE, "factor": POSITIVE, "original_max_position_embeddings": SIZE,
             "beta_fast": NUMBER, "beta_slow": NUMBER, "mscale": NUMBER, "mscale_all_dim": NUMBER,
             "attention_factor": POSITIVE, "truncate": FLAG, "rope_type": NAME, "type": NAME}


def check_keys(d, spec, where=""):
    """Each key of `spec` in the dict d is absent, null, or of its type and range; else one UserError."""
    for key, (kind, ok, expected) in spec.items():
        v = d.get(key)
        if v is None:
            continue
        typed = isinstance(v, (int, float) if kind is float else kind) and (kind is bool or type(v) is not bool)
        if not typed or (ok is not None and not ok(v)):
            raise UserError(f"config key {where + key!r} is {v!r}, expected {expected}")


def config_from_hf(d):
    """Map a Hugging Face config.json dict (legacy hub keys or transformers-5 keys) to ModelConfig."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if d.get(key) is None:
            raise UserError(f"config key {key!r} is missing, expected an integer >= 1")
    check_keys(d, CONFIG_KEYS)
    for key in ("rope_parameters", "rope_scaling", "quantization_config"):
        if not isinstance(d.get(key) or {}, dict):
            raise UserError(f"config key {key!r} is {d[key]!r}, expected an object or null")
    rope_key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    check_keys(d.get(rope_key) or {}, ROPE_KEYS, f"{rope_key}.")
    dense = d.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(type(l) is int for l in dense):
        raise UserError(f"config key 'mlp_only_layers' is {dense!r}, expected a list of layer numbers")
    L, H = d["num_hidden_layers"], d["num_attention_heads"]
    c = ModelConfig(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=L,
                    rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=d.get("tie_word_embeddings", False),
                    max_position_embeddings=d.get("max_position_embeddings", 4096),
                    num_attention_heads=H, num_key_value_heads=d.get("num_key_value_heads") or H)
    # rope: transformers 5 writes `rope_parameters`, the hub configs `rope_theta` + `rope_scaling`
    rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    c.rope_theta = float(rp.get("rope_theta", d.get("rope_theta", 1e6 if mt == "mixtral" else 10000.0)))
    c.rope_type = rp.get("rope_type", rp.get("type", "default"))
    if c.rope_type not in ("default", "yarn"):
        raise UserError(f"rope type {c.rope_type!r} is not supported; supported: default, yarn")
    if c.rope_type == "yarn" and rp.get("factor") is None:
        raise UserError(f"config key {rope_key!r} is YaRN without a 'factor', expected a number > 0")
    rp.setdefault("original_max_position_embeddings", c.max_position_embeddings)
    c.rope_parameters = rp
    c.n_routed_experts = _first(d, "n_routed_experts", "num_experts", "num_local_experts", default=0)
    c.num_experts_per_tok = d.get("num_experts_per_tok", 0)
    c.intermediate_size = d.get("intermediate_size", 0)
    c.moe_intermediate_size = d.get("moe_intermediate_size", c.intermediate_size)
    c.norm_topk_prob = d.get("norm_topk_prob", False)
    c.num_nextn_predict_layers = d.get("num_nextn_predict_layers") or 0

    if mt in ("deepseek_v2", "deepseek_v3"):
        c.mla, c.q_lora_rank, c.kv_lora_rank = True, d.get("q_lora_rank"), d["kv_lora_rank"]
        c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim = d["qk_nope_head_dim"], d["qk_rope_head_dim"], d["v_head_dim"]
        c.qkv_bias = c.o_bias = d.get("attention_bias", False)
        c.shared_intermediate_size = c.moe_intermediate_size * (d.get("n_shared_experts") or 0)
        first_dense = d.get("first_k_dense_replace", 3 if mt == "deepseek_v3" else 0)
        c.moe_layers = [l for l in range(L) if l >= first_dense] if c.n_routed_experts else []
        c.router_logits_fp32 = True
        c.n_group, c.topk_group = d.get("n_group") or 1, d.get("topk_group") or 1
        c.routed_scaling_factor = d.get("routed_scaling_factor") or 1.0
        if mt == "deepseek_v2":
            c.rope_interleave = True
            c.topk_method = d.get("topk_method") or "greedy"
            # transformers (our oracle) ignores norm_topk_prob for V2; every published V2 config has it false
            c.norm_topk_prob = False
        else:
            c.rope_interleave = d.get("rope_interleave", True)
            c.scoring_func, c.topk_method = "sigmoid", "noaux_tc"
            c.norm_topk_prob = d.get("norm_topk_prob", True)
        if c.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise UserError(f"topk_method {c.topk_method!r} is not supported")
        block = (d.get("quantization_config") or {}).get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2
                                      and all(type(b) is int and b >= 1 for b in block)):
            raise UserError(f"config key 'quantization_config.weight_block_size' is {block!r}, "
                            f"expected [rows, columns] of integers >= 1")
        if block:
            c.fp8_block = tuple(block)
    else:
        c.head_dim = d.get("head_dim") or c.hidden_size // H
        c.router_weights_fp32 = mt == "mixtral"  # Mixtral keeps fp32 weights; Qwen/OLMoE cast back
        if mt == "qwen2_moe":
            c.qkv_bias = d.get("qkv_bias", True)
            c.shared_intermediate_size = d.get("shared_expert_intermediate_size") or 0
            c.shared_expert_gate = c.shared_intermediate_size > 0
        elif mt == "qwen3_moe":
            c.qkv_bias = c.o_bias = d.get("attention_bias", False)
            c.qk_norm = "head"
        elif mt == "olmoe":
            c.qkv_bias = c.o_bias = d.get("attention_bias", False)
            c.qk_norm, c.clip_qkv = "proj", d.get("clip_qkv")
        elif mt == "mixtral":
            c.norm_topk_prob = True  # Mixtral always renormalises its top-2
        if mt in ("qwen2_moe", "qwen3_moe"):
            # note l+1: with decoder_sparse_step 2, layers 1, 3, 5, ... are MoE
            step, dense = d.get("decoder_sparse_step") or 1, set(d.get("mlp_only_layers") or [])
            c.moe_layers = [l for l in range(L) if l not in dense and c.n_routed_experts > 0 and (l + 1) % step == 0]
        else:
            c.moe_layers = list(range(L))
    if c.moe_layers and not 0 < c.num_experts_per_tok <= c.n_routed_experts:
        raise UserError(f"num_experts_per_tok {c.num_experts_per_tok} must be in 1..{c.n_routed_experts}")
    if c.topk_method != "greedy" and c.n_routed_experts % c.n_group:
        raise UserError(f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}")
    if c.topk_method != "greedy" and c.topk_group > c.n_group:
        raise UserError(f"config key 'topk_group' is {c.topk_group}, expected at most n_group {c.n_group}")
    if not c.mla and H % c.num_key_value_heads:
        raise UserError(f"config key 'num_key_value_heads' is {c.num_key_value_heads}, expected a divisor of "
                        f"num_attention_heads {H}")
    return c



def read_config(path):
    """A model folder's config.json as a ModelConfig, each key checked, and the folder's tokenizer checked
    against it: every script reads this first, so bad input stops before any work."""
    path = Path(path)
    if path.is_file():
        raise UserError(f"{path}: is a file, expected a model folder (config.json, *.safetensors)")
    if not path.is_dir():
        raise UserError(f"{path}: model folder does not exist "
                        f"(python train.py builds the default ones in {DEFAULT_RUN})")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: no config.json in the model folder")
    d = read_json(cfg_file, "an object of config keys")
    try:
        cfg = config_from_hf(d)
    except UserError as e:
        raise UserError(f"{cfg_file}: {e}") from None
    except (KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: missing or malformed key {e}") from None
    load_tokenizer(path, cfg.vocab_size)  # a broken or too large tokenizer stops here, before any work
    return cfg


def read_json(f, expected):
    """The JSON object in file f, or one UserError naming the file: unreadable, not UTF-8, not JSON,
    nested too deeply for Python's parser, or not an object (`expected` says what it should be)."""
    try:
        d = json.loads(Path(f).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{f}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{f}: not UTF-8 text (byte {e.start}), expected JSON") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{f}: JSON nested too deeply, expected {expected}") from None
    if not isinstance(d, dict):
        raise UserError(f"{f}: a JSON {type(d).__name__}, expected {expected}")
    return d


def build_model(config, experts_on_disk=False):
    """A model.Transformer from a config.json dict (or ModelConfig), on the current default device."""
    cfg = config if isinstance(config, ModelConfig) else config_from_hf(config)
    return Transformer(cfg, experts_on_disk)


# ----------------------------------------------------------------------------------------------
# Safetensors, read directly: the header gives every tensor's dtype, shape and byte range, so a
# tensor is a zero-copy view of the memory-mapped file (store.py's expert store reads the same way)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorInfo(NamedTuple):
    file: Path
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path):
    """{name: TensorInfo} of one .safetensors file, after checking the header as the format defines
    it: an 8-byte little-endian length, then a JSON object mapping each name to its dtype, shape and
    [begin, end) byte range in the data that follows; the ranges tile the data exactly, in order,
    without gaps or overlaps, and each is as long as dtype x shape says. Anything else is a damaged
    file, reported in one line before any weight is read."""
    path = Path(path)
    size = path.stat().st_size

    def damaged(what):
        return UserError(f"{path}: damaged safetensors file: {what}")

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise damaged(f"{size} bytes, too short for the 8-byte header length")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise damaged(f"the header claims {n:,} bytes but the file has {size:,} (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise damaged(f"the header is a JSON {type(header).__name__}, expected an object of tensors")
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise damaged(f"entry {name!r} is {meta!r}, expected an object with dtype, shape and data_offsets")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise damaged(f"tensor {name!r} has dtype {dtype!r}, expected one of {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise damaged(f"tensor {name!r} has shape {shape!r}, expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise damaged(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end")
        dtype = SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise damaged(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but shape {shape} of "
                          f"{meta['dtype']} needs {math.prod(shape) * dtype.itemsize}")
        infos[name] = TensorInfo(path, dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])
    # the byte ranges must tile the data: each starts where the previous ended, the last ends the file
    at = 8 + n
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != at:
            what = "overlaps the previous tensor" if info.start < at else f"leaves a gap of {info.start - at} bytes"
            raise damaged(f"tensor {name!r} starts at data byte {info.start - 8 - n}, expected {at - 8 - n} ({what})")
        at = info.end
    if at != size:
        raise damaged(f"the tensors end at byte {at:,}, but the file has {size:,} (truncated or padded)")
    return infos


class MappedFiles:
    """Memory maps of the checkpoint's files, opened once; tensors are views into them."""

    def __init__(self):
        self.maps = {}

    def tensor(self, info):
        if info.file not in self.maps:
            with open(info.file, "rb") as f:
                # copy-on-write map: tensors may be written to (e.g. the router while training) without touching the file
                self.maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # a read-only map is read only: torch's warning would precede an error line
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            t = torch.frombuffer(self.maps[info.file], dtype=info.dtype, count=count, offset=info.start)
        return t.view(info.shape)


def checkpoint_tensors(path):
    """{name: TensorInfo} for a checkpoint folder: one model.safetensors, or the shards of the index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "an object with a 'weight_map'").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
        for name, shard in weight_map.items():  # a shard is a file of this folder: never a path out of it
            if shard != Path(shard).name or shard in ("", ".", ".."):
                raise UserError(f"{index}: weight_map entry {name!r} names shard {shard!r}, "
                                f"expected a plain file name inside {path}")
        infos = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise UserError(f"{index}: shard {shard!r} is named in weight_map but missing from {path}")
            header = read_safetensors_header(path / shard)
            for name, file in weight_map.items():
                if file == shard:
                    if name not in header:
                        raise UserError(f"{path / shard}: tensor {name!r} listed in the index is not in the shard")
                    infos[name] = header[name]
        return infos
    single = path / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return read_safetensors_header(single)


# Where a module name differs from the checkpoint's tensor name: one table per architecture.
RENAMES = {
    "mixtral": [(".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")],
}


def module_name(cfg, disk_name):
    for disk, mod in RENAMES.get(cfg.model_type, []):
        disk_name = disk_name.replace(disk, mod)
    return disk_name


def disk_name(cfg, module_name):
    for disk, mod in RENAMES.get(cfg.model_type, []):
        module_name = module_name.replace(mod, disk)
    return module_name


def is_routed_expert(name):
    return ".mlp.experts." in name or ".block_sparse_moe.experts." in name


def dequantize_fp8(w, scale_inv, block):
    """DeepSeek-V3 FP8: W = W_fp8 * s[i // bo, j // bi], one fp32 scale per (bo, bi) block (edges partial)."""
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]
    return w.float() * s


# ----------------------------------------------------------------------------------------------
# Loading and saving a model

def load_model(path, device="cpu", dtype=torch.float32, experts_on_disk=False):
    """Build the model on the meta device, then fill it from memory-mapped safetensors, checking that
    the checkpoint has exactly the tensors the config implies, each with the right shape."""
    path = Path(path)
    cfg = read_config(path)
    infos = checkpoint_tensors(path)
    check_layers(cfg, infos, path)
    with torch.device("meta"):
        model = Transformer(cfg, experts_on_disk)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files, state = MappedFiles(), {}
    for name, info in infos.items():
        if name.endswith("_scale_inv") or name.endswith("rotary_emb.inv_freq"):
            continue  # FP8 scales are used with their weight; rotary buffers are recomputed
        if (layer_of(name) or 0) >= cfg.num_hidden_layers:
            continue  # DeepSeek-V3's multi-token-prediction layer (61) is not part of the decoder
        if experts_on_disk and is_routed_expert(name):
            continue
        key = module_name(cfg, name)
        if key not in expected:
            raise UserError(f"{info.file}: unexpected tensor {name!r} for a {cfg.model_type} model with this config")
        if info.shape != expected[key]:
            raise UserError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"config implies {list(expected[key])}")
        check_float(info, name)
        t = files.tensor(info)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = infos.get(name + "_scale_inv")
            if scale is None:
                raise UserError(f"{info.file}: FP8 tensor {name!r} has no {name + '_scale_inv'!r}")
            t = dequantize_fp8(t, files.tensor(check_float(scale, name + "_scale_inv")), cfg.fp8_block)
        keep_fp32 = name.endswith("e_score_correction_bias")  # tiny, and used for exact comparisons
        state[key] = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        check_finite(state[key], info, name)  # the one pass over the weights as they are read
    if cfg.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{path}: missing tensor {disk_name(cfg, missing[0])!r}{more}")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def layer_of(name):
    """The decoder layer a tensor name belongs to (model.layers.N.*), or None."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None


def check_layers(cfg, infos, path):
    """Every layer the tensors hold is one of the config's, or one of the multi-token-prediction layers
    that DeepSeek-V3 stores after them when the config declares them (num_nextn_predict_layers): a
    config with too few layers must not load as a truncated model."""
    last = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    extra = max(((layer_of(n), n) for n in infos if (layer_of(n) or 0) >= last), default=None)
    if extra is not None:
        mtp = f" and num_nextn_predict_layers {cfg.num_nextn_predict_layers}" if cfg.num_nextn_predict_layers else ""
        raise UserError(f"{path}: tensor {extra[1]!r} is in layer {extra[0]}, but config.json has num_hidden_layers "
                        f"{cfg.num_hidden_layers}{mtp}; expected the config to account for every layer")


DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def check_float(info, name):
    """A weight stored as integers would be read as numbers of another kind: refused."""
    if not info.dtype.is_floating_point:
        raise UserError(f"{info.file}: tensor {name!r} is stored as {DTYPE_NAMES[info.dtype]}, "
                        f"expected a floating-point dtype (F32, F16, BF16 or F8)")
    return info


def check_finite(t, info, name):
    """A NaN or Inf weight turns every output into garbage without an error: refused by name. The minimum
    and maximum carry any NaN or Inf, read in one pass without a mask as large as the tensor."""
    if t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():
        raise UserError(f"{info.file}: tensor {name!r} holds NaN or infinite values, expected finite weights")


def load_tokenizer(path, vocab_size=None):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer`, or None when there is none; checked with
    its tokenizer_config.json (read by data.py): both parse, the eos_token is a string, and every token id
    fits the model's `vocab_size` (an id beyond it would index past the embedding)."""
    folder = Path(path)
    if (folder / "tokenizer_config.json").is_file():
        eos = read_json(folder / "tokenizer_config.json", "an object of tokenizer settings").get("eos_token")
        if not isinstance(eos.get("content") if isinstance(eos, dict) else (eos or ""), str):
            raise UserError(f"{folder / 'tokenizer_config.json'}: eos_token is {eos!r}, expected a string or "
                            f"an object with a 'content' string")
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{f}: not a valid tokenizer.json ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    n = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if vocab_size is not None and n > vocab_size:
        raise UserError(f"{f}: the tokenizer has {n} token ids (0..{n - 1}), more than the model's vocab_size "
                        f"{vocab_size}; expected a tokenizer that fits the model")
    return tok


def save_model(model, out_dir, config_dict, files=None):
    """Write `model` to out_dir in the Hugging Face layout that load_model (and transformers) read:
    config.json and model.safetensors under the checkpoint's tensor names, plus `files`
    {name: text, or a Path to copy}; all in a temporary folder renamed into place at the end."""
    cfg = model.config
    state = {disk_name(cfg, k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}  # a tied head is the embedding
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # save_file makes it private; a model is meant to be shared
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        for name, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_text(content)



def stored_dtype(path):
    """The floating dtype that holds most of a checkpoint's bytes (its weights' dtype on disk)."""
    by_dtype = {}
    for info in checkpoint_tensors(Path(path)).values():
        if info.dtype.is_floating_point:
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.end - info.start
    return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32


def export_tuned(base_dir, out_dir, cfg, routers, results):
    """The tuned checkpoint (train.py): out_dir written atomically, every file of base_dir hard-linked (or
    copied) except the safetensors files that hold router tensors, rewritten with `routers` ({MoE layer:
    (E, D) tensor}) in the checkpoint's own dtype; names, shapes, shards and the index stay as they were.
    The tuned model costs only its routers on disk and loads wherever the base loads."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    routers = {disk_name(cfg, f"model.layers.{l}.mlp.gate.weight"): w for l, w in routers.items()}
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {name: "model.safetensors" for name in routers}
    to_rewrite = {weight_map[name] for name in routers}
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        for f in sorted(base_dir.iterdir()):
            if not f.is_file() or f.name == "results.json":
                continue
            if f.name in to_rewrite:
                tensors = {}
                with safe_open(f, framework="pt") as st:
                    metadata = st.metadata()
                    for name in st.keys():
                        t = st.get_tensor(name)
                        tensors[name] = routers[name].to(t.dtype).contiguous() if name in routers else t
                save_file(tensors, tmp / f.name, metadata=metadata)
                (tmp / f.name).chmod(0o644)  # safetensors creates files readable by their owner only
            else:
                try:
                    os.link(f, tmp / f.name)  # same bytes, no copy
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Command line: a summary of a checkpoint, or a short generation

def main(argv=None):
    p = ArgumentParser(description="Load a MoE checkpoint with model.py; summarise it or continue a prompt.")
    p.add_argument("--model", default=str(DEFAULT_BASE_DIR), help="checkpoint folder in Hugging Face layout "
                                                                 "(default: %(default)s)")
    p.add_argument("--prompt", default=None, help="text to continue, greedily (needs tokenizer.json in the folder)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate after --prompt (default: 40)")
    args = p.parse_args(argv)
    with user_errors(), fatal_errors():  # Ctrl-C or no memory while generating: one line too
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        t0 = time.perf_counter()
        model = load_model(args.model)
        tok = load_tokenizer(args.model)
        if args.prompt is not None and tok is None:
            raise UserError(f"{args.model}: no tokenizer.json to encode --prompt")
        ids = tok.encode(args.prompt).ids if args.prompt is not None else None  # "" encodes to no tokens
        if ids is not None:
            check_prompt(len(ids), args.max_new_tokens, model.config.max_position_embeddings)
        cfg = model.config
        total, active = count_parameters(model)
        print(f"{args.model}: {cfg.model_type}, {cfg.num_hidden_layers} layers ({len(cfg.moe_layers)} MoE), "
              f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, {total:,} parameters "
              f"({active:,} active), loaded in {time.perf_counter() - t0:.2f}s")
        if ids is not None:
            out = generate(model, torch.tensor([ids]), args.max_new_tokens)  # (1, T)
            print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
