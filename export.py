"""
export.py: take a (ReMoE-tuned) model to llama.cpp, the runtime the ReMoE paper deploys with. A GGUF
file is key/values (hyperparameters, tokenizer) and named tensors in ggml's layout; llama.cpp's loader
for each architecture asks for exact names and computes with fixed rules, so an export is three tables
(architecture, tensor names, keys) plus the variants whose math llama.cpp cannot reproduce, refused.
Two modes: a full export (every tensor and the byte-level BPE tokenizer, f32/f16/bf16/q8_0; routers,
norms and biases stay f32), or a router patch: the GGUF a user already runs (say a Q4_K_M) copied byte
for byte with only the routers (ffn_gate_inp) replaced. Checked by running stock llama.cpp (tests).

    python export.py runs/default/remoe --gguf runs/remoe.gguf                    # the default tuned model (CPU)
    python export.py runs/default/remoe --gguf runs/remoe-q8.gguf --dtype q8_0    # 8-bit weights, f32 routers
    python export.py runs/ds2-lite/remoe --patch-gguf DeepSeek-V2-Lite-Q4_K_M.gguf --gguf remoe-Q4_K_M.gguf

Leaves out tokenizers other than byte-level BPE, k-quants, split GGUFs. Shapes (torch order; ggml's ne
is the reverse): D hidden, E routed experts, F expert width, H heads, r kv_lora_rank, dn/dv/dr head dims, V vocab.
"""

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import gguf
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import load_model, load_tokenizer, read_config, stored_dtype
from cli import ArgumentParser, UserError, atomic_write, check_output, fatal_errors, user_errors
from model import rope_frequencies, yarn_mscale

# ----------------------------------------------------------------------------------------------
# What llama.cpp runs: its name for each architecture, and the variants it cannot reproduce

GGUF_ARCH = {
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",   # one loader for both; V3's sigmoid scores, bias and groups are keys
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "mixtral": "llama",           # llama.cpp runs Mixtral as a llama with expert tensors
}


def unsupported(cfg):
    """Why llama.cpp's loader for this architecture would compute something else, or None. Each
    reason names the rule llama.cpp hard-codes (src/models/<arch>.cpp, build_moe_ffn)."""
    mt, all_moe = cfg.model_type, cfg.moe_layers == list(range(cfg.num_hidden_layers))
    if not cfg.moe_layers:
        return "it has no MoE layers"
    if cfg.mla:
        if not cfg.shared_intermediate_size:
            return "llama.cpp's deepseek2 needs shared experts (n_shared_experts >= 1)"
        if cfg.qkv_bias or cfg.o_bias:
            return "llama.cpp's deepseek2 has no attention biases (attention_bias: true)"
        L = cfg.num_hidden_layers
        if cfg.q_lora_rank and (L in (26, 27) or (L == 48 and cfg.vocab_size == 128256)):
            return (f"llama.cpp takes a deepseek2 model of {L} layers for a V2-Lite-like one without q_lora_rank "
                    "and then looks for attn_q, which a model with q_lora_rank does not have")
        if not cfg.rope_interleave:
            return "llama.cpp's deepseek2 rotates interleaved rope pairs (rope_interleave: false)"
        if cfg.topk_method == "group_limited_greedy" and cfg.topk_group < cfg.n_group:
            return ("llama.cpp ranks expert groups by the sum of each group's best two scores (DeepSeek-V3's "
                    "rule); topk_method group_limited_greedy ranks them by the best score")
    elif mt in ("qwen2_moe", "qwen3_moe", "olmoe") and not all_moe:
        return f"llama.cpp's {GGUF_ARCH[mt]} makes every layer MoE (decoder_sparse_step / mlp_only_layers)"
    if mt == "qwen2_moe" and cfg.norm_topk_prob:
        return "llama.cpp's qwen2moe never renormalises the top-k weights (norm_topk_prob: true)"
    if mt == "qwen2_moe" and not cfg.shared_expert_gate:
        return "llama.cpp's qwen2moe needs the gated shared expert"
    if mt == "qwen3_moe" and not cfg.norm_topk_prob:
        return "llama.cpp's qwen3moe always renormalises the top-k weights (norm_topk_prob: false)"
    if mt == "olmoe" and cfg.norm_topk_prob:
        return "llama.cpp's olmoe never renormalises the top-k weights (norm_topk_prob: true)"
    if mt == "olmoe" and cfg.clip_qkv is not None:
        return "llama.cpp's olmoe does not clamp q, k, v (clip_qkv)"
    if mt == "olmoe" and cfg.num_key_value_heads != cfg.num_attention_heads:
        return "llama.cpp's olmoe sizes k_norm for as many key/value heads as query heads"
    if mt in ("qwen2_moe", "olmoe") and cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        return f"llama.cpp's {GGUF_ARCH[mt]} needs heads x head_dim == hidden_size"
    if mt in ("qwen3_moe", "olmoe") and cfg.o_bias:
        return f"llama.cpp's {GGUF_ARCH[mt]} has no o_proj bias (attention_bias: true)"
    if cfg.rope_type == "yarn" and not cfg.rope_parameters.get("truncate", True):
        return "llama.cpp rounds YaRN's correction range to whole dims (rope_parameters.truncate: false)"
    return None


def llama_cpp_arch(cfg, path):
    """llama.cpp's architecture name for a model.py config, or a UserError saying why not."""
    reason = unsupported(cfg)
    if reason:
        raise UserError(f"{path}: {cfg.model_type} model cannot be exported for llama.cpp: {reason}")
    return GGUF_ARCH[cfg.model_type]


# ----------------------------------------------------------------------------------------------
# Tensors: model.py's module names (= checkpoint keys) -> llama.cpp's names, one table for all

TOP_TENSORS = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
               "lm_head.weight": "output"}   # always written, tied or not: qwen2moe and olmoe require it

LAYER_TENSORS = {  # the part between `model.layers.{l}.` and `.weight` / `.bias` -> `blk.{l}.<name>`
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    # grouped-query attention
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    # multi-head latent attention (kv_b_proj is split below)
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    # dense FFN layers
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # MoE layers: the router (what ReMoE tunes), shared experts (DeepSeek plural, Qwen2 singular + gate)
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
ROUTER = "ffn_gate_inp.weight"


class GGUFTensor(NamedTuple):
    name: str                         # llama.cpp's name, e.g. blk.3.ffn_gate_inp.weight
    shape: tuple                      # torch order
    get: Callable[[], torch.Tensor]   # reads (and reshapes) the data only when it is written


def rope_pairs_interleaved(w, n_heads):
    """Rows of q_proj / k_proj [n_heads*hd, D] reordered from half-rotation pairs (i, i+hd/2), which
    Hugging Face Mixtral rotates, to adjacent pairs (2i, 2i+1), which llama.cpp's llama rotates."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg, state):
    """Every tensor of the GGUF, in the order of model.py's state dict, from model.py's tensors."""
    E = cfg.n_routed_experts
    H, dn, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    plan = []
    for name, t in state.items():
        if name in TOP_TENSORS:
            plan.append(GGUFTensor(TOP_TENSORS[name] + ".weight", tuple(t.shape), lambda t=t: t))
            continue
        _, _, l, rest = name.split(".", 3)        # model.layers.{l}.{rest}
        part, leaf = rest.rsplit(".", 1)
        blk = f"blk.{l}."
        if part.startswith("mlp.experts."):      # E experts -> one (E, out, in) tensor per projection
            e, proj = part.split(".")[2:]
            if e == "0":
                keys = [f"model.layers.{l}.mlp.experts.{i}.{proj}.weight" for i in range(E)]
                plan.append(GGUFTensor(blk + EXPERT_TENSORS[proj] + ".weight", (E, *t.shape),
                                       lambda keys=keys: torch.stack([state[k] for k in keys])))
        elif part == "self_attn.kv_b_proj":      # llama.cpp multiplies by k_b and v_b separately (MLA absorption)
            def kv_b(t=t):
                return t.view(H, dn + dv, r)     # (H, dn+dv, r): per head, k_nope rows then value rows
            plan.append(GGUFTensor(blk + "attn_k_b.weight", (H, r, dn),
                                   lambda kv_b=kv_b: kv_b()[:, :dn].transpose(1, 2)))
            plan.append(GGUFTensor(blk + "attn_v_b.weight", (H, dv, r), lambda kv_b=kv_b: kv_b()[:, dn:]))
        elif leaf == "e_score_correction_bias":  # DeepSeek-V3's selection bias
            plan.append(GGUFTensor(blk + "exp_probs_b.bias", tuple(t.shape), lambda t=t: t))
        elif part == "mlp.shared_expert_gate":   # (1, D) -> (D,): llama.cpp wants a vector
            plan.append(GGUFTensor(blk + "ffn_gate_inp_shexp.weight", (t.shape[-1],), lambda t=t: t.reshape(-1)))
        elif cfg.model_type == "mixtral" and part in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = H if part.endswith("q_proj") else cfg.num_key_value_heads
            plan.append(GGUFTensor(f"{blk}{LAYER_TENSORS[part]}.{leaf}", tuple(t.shape),
                                   lambda t=t, n=heads: rope_pairs_interleaved(t, n)))
        elif part in LAYER_TENSORS:
            plan.append(GGUFTensor(f"{blk}{LAYER_TENSORS[part]}.{leaf}", tuple(t.shape), lambda t=t: t))
        else:
            raise UserError(f"tensor {name!r} has no llama.cpp counterpart in export.py's tables")
    return plan


# ----------------------------------------------------------------------------------------------
# Data types: what the user asks for, and what each tensor gets

DTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
STORED_TO_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # FP8 -> bf16


def tensor_type(t, requested):
    """Routers, norms, biases and vectors stay float32 (as in llama.cpp's converter and quantizer:
    they are tiny, and the router decides which experts run). A Q8_0 block is 32 values of one row,
    so rows of another length fall back to float16, as in the converter."""
    if len(t.shape) == 1 or t.name.endswith(("_norm.weight", ".bias", ROUTER)):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[requested][0]
    return requested if t.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def nbytes(shape, qtype):
    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def encode(t, qtype):
    """A torch tensor as the numpy array GGUF stores for `qtype`."""
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return a
    if qtype == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)  # bf16 and q8_0, as uint8 bytes


# ----------------------------------------------------------------------------------------------
# Metadata: hyperparameters per architecture, YaRN, the tokenizer

def yarn_factors(cfg, factor):
    """(rope.scaling.attn_factor R, yarn_log_multiplier L or None) making llama.cpp scale rope and
    attention as model.py does. With g(m) = 1 + 0.1 m ln(factor), llama.cpp (llama-context.cpp,
    models/deepseek2.cpp) multiplies cos/sin by R and, for deepseek2, the attention logits by
    (R g(L))^2 when L is set, else cos/sin by R g(1) and the logits by (R g(1))^2; other
    architectures get cos/sin x R g(1) and plain logits. model.py multiplies cos/sin by `a`
    (rope_frequencies) and MLA logits by g(mscale_all_dim)^2. Published DeepSeek configs give R = 1
    and L = mscale_all_dim, what llama.cpp's converter writes; other mscale pairs need R != 1."""
    def g(m):
        return 1 + 0.1 * m * math.log(factor)

    a = rope_frequencies(cfg, cfg.qk_rope_head_dim if cfg.mla else cfg.head_dim)[1]
    if not cfg.mla:
        return a / g(1), None
    m_all = cfg.rope_parameters.get("mscale_all_dim")
    logit_factor = yarn_mscale(factor, m_all) if m_all else 1.0   # sqrt of model.py's scale multiplier
    L = (logit_factor / a - 1) / (0.1 * math.log(factor))
    if abs(L) < 1e-6:   # llama.cpp reads a log multiplier of 0 as "not set"
        return a / g(1), None
    return a, L


def write_hparams(w, cfg):
    """The `{arch}.*` keys llama.cpp's loader reads for this architecture."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_head_count(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.mla:
        # MLA runs as multi-query attention over the latent: one "kv head" of r + dr (llama.cpp's absorption)
        w.add_head_count_kv(1)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.attn_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        # always written: llama.cpp reads it for every layer count but 26 and 27 (which it takes for V2-Lite)
        w.add_q_lora_rank(cfg.q_lora_rank or 0)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        w.add_leading_dense_block_count(cfg.moe_layers[0])
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_count(cfg.shared_intermediate_size // cfg.moe_intermediate_size)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)  # model.py (as transformers) keeps it false for V2
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        if cfg.topk_method == "noaux_tc" and cfg.topk_group < cfg.n_group:
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
    else:
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.model_type == "mixtral":
            w.add_feed_forward_length(cfg.moe_intermediate_size)  # llama's experts take their width from n_ff
        else:
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_gate:
            w.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    if cfg.rope_type == "yarn":
        p = cfg.rope_parameters
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(p["factor"])
        w.add_rope_scaling_orig_ctx_len(p["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(p.get("beta_fast") or 32.0)
        w.add_rope_scaling_yarn_beta_slow(p.get("beta_slow") or 1.0)
        R, L = yarn_factors(cfg, p["factor"])
        if L is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * L)  # llama.cpp divides this key by 0.1 (its converter's convention)
        if abs(R - 1) > 1e-7:
            w.add_rope_scaling_attn_factors(R)


class BPEVocab(NamedTuple):
    tokens: list        # V strings: byte-level token text, "[PAD<i>]" for ids no token uses
    types: list         # V gguf.TokenType: NORMAL, CONTROL (special), USER_DEFINED (other added), UNUSED
    merges: list        # "a b" strings in rank order
    special: dict       # {"bos": id, "eos": id} from config.json


def read_tokenizer(folder, vocab_size, config):
    """tokenizer.json (byte-level BPE with GPT-2's split: what data.py trains) as llama.cpp's `gpt2`
    tokenizer with the `gpt-2` pre-tokenizer, read from the vocabulary and merges themselves, so that a
    freshly trained tokenizer works (llama.cpp's converter recognises only hashes of known ones)."""
    f = Path(folder) / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{folder}: no tokenizer.json; a GGUF carries its tokenizer")
    load_tokenizer(folder, vocab_size)  # parses as the tokenizers library does: ids >= 0 that fit vocab_size
    spec = json.loads(f.read_text())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or spec.get("normalizer") or model.get("byte_fallback")):
        raise UserError(f"{f}: export.py writes byte-level BPE with GPT-2's split only (got model "
                        f"{model.get('type')!r}, pre-tokenizer {pre.get('type')!r}); convert the base model with "
                        f"llama.cpp's convert_hf_to_gguf.py and use --patch-gguf")
    ids = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    ids.update({tok: t["id"] for tok, t in added.items()})
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [T.UNUSED] * vocab_size  # rows no token uses
    for tok, i in ids.items():
        tokens[i] = tok
        types[i] = (T.CONTROL if added[tok]["special"] else T.USER_DEFINED) if tok in added else T.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {k: config[f"{k}_token_id"] for k in ("bos", "eos")
               if isinstance(config.get(f"{k}_token_id"), int) and 0 <= config[f"{k}_token_id"] < vocab_size}
    return BPEVocab(tokens, types, merges, special)


def write_tokenizer(w, vocab):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if "bos" in vocab.special:
        w.add_bos_token_id(vocab.special["bos"])
    if "eos" in vocab.special:
        w.add_eos_token_id(vocab.special["eos"])
    w.add_add_bos_token(False)  # data.py's tokenizer adds no BOS; llama.cpp would prepend one otherwise
    w.add_add_eos_token(False)


# ----------------------------------------------------------------------------------------------
# Full export

def checkpoint_state(model_dir):
    """model.py's tensors by module name, loaded and shape-checked by load_model: zero-copy views of the
    memory-mapped files in their stored dtype (FP8 is dequantized, to bfloat16)."""
    stored = stored_dtype(model_dir)
    return load_model(model_dir, dtype=stored if stored in STORED_TO_DTYPE else torch.bfloat16).state_dict()


def export_gguf(model_dir, out, dtype=None):
    """Write model_dir as a GGUF that stock llama.cpp loads. Returns a one-line summary."""
    out = check_output(out, "--gguf", [model_dir])  # never into the model folder it reads
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = read_config(model_dir)
    arch = llama_cpp_arch(cfg, model_dir)
    vocab = read_tokenizer(model_dir, cfg.vocab_size, json.loads((Path(model_dir) / "config.json").read_text()))
    dtype = dtype or STORED_TO_DTYPE.get(stored_dtype(model_dir), "bf16")
    plan = gguf_tensors(cfg, checkpoint_state(model_dir))
    types = [tensor_type(t, DTYPES[dtype]) for t in plan]
    t0 = time.perf_counter()
    with atomic_write(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(Path(model_dir).resolve().name)
        w.add_file_type(FILE_TYPES[dtype])
        if dtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, cfg)
        write_tokenizer(w, vocab)
        for t, qtype in zip(plan, types):
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = sum(nbytes(t.shape, q) for t, q in zip(plan, types))
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"export {out.name}") as bar:
            for t, qtype in zip(plan, types):  # one tensor in memory at a time
                w.write_tensor_data(encode(t.get(), qtype))
                bar.update(nbytes(t.shape, qtype))
        w.close()
    return (f"{out}: {arch}, {len(plan)} tensors, {dtype} (routers, norms, biases f32), "
            f"{out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------
# Router patch: a base GGUF, byte for byte, with the tuned routers written over its own

def read_gguf(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--patch-gguf {path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF starts with these 4 bytes; anything else is another kind of file
            raise UserError(f"--patch-gguf {path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # the reader says "GGUF magic invalid" and the like
        raise UserError(f"--patch-gguf {path}: not a readable GGUF file ({e})") from None


def gguf_value(reader, key):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def check_same_model(reader, path, cfg, tuned_dir, plan):
    """Refuse, naming the difference, unless the GGUF is the tuned model's architecture, with its
    layers, experts and router shapes, and its norms (float32 in every GGUF) equal the tuned
    model's, which ReMoE never changes: routers of one model are meaningless in another."""
    arch = GGUF_ARCH[cfg.model_type]
    expected = {"general.architecture": arch, f"{arch}.block_count": cfg.num_hidden_layers,
                f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.expert_count": cfg.n_routed_experts,
                f"{arch}.expert_used_count": cfg.num_experts_per_tok}
    for key, want in expected.items():
        got = gguf_value(reader, key)
        if got != want:
            raise UserError(f"--patch-gguf {path}: {key} is {got!r}, but {tuned_dir} ({cfg.model_type}) has {want!r}")
    in_gguf = {t.name: t for t in reader.tensors}
    routers = {t.name for t in plan if t.name.endswith(ROUTER)}
    for name in sorted(set(n for n in in_gguf if n.endswith(ROUTER)) ^ routers):
        where = "the GGUF" if name in in_gguf else str(tuned_dir)
        raise UserError(f"--patch-gguf {path}: router {name} is only in {where} (MoE layers differ)")
    for t in plan:
        g = in_gguf.get(t.name)
        if g is None or not (t.name.endswith(ROUTER) or t.name.endswith("_norm.weight")):
            continue
        shape = tuple(int(n) for n in reversed(g.shape))  # ggml's ne -> torch order
        if shape != t.shape:
            raise UserError(f"--patch-gguf {path}: {t.name} has shape {list(shape)}, "
                            f"{tuned_dir} has {list(t.shape)}")
        if t.name.endswith("_norm.weight") and g.tensor_type in (gguf.GGMLQuantizationType.F32,):
            diff = np.abs(np.asarray(g.data, dtype=np.float32).reshape(shape) - t.get().float().numpy()).max()
            if diff > 1e-3:
                raise UserError(f"--patch-gguf {path}: {t.name} differs from {tuned_dir}'s by up to {diff:.3g}: "
                                f"the GGUF is not of the model these routers were tuned from")
    return [in_gguf[t.name] for t in plan if t.name.endswith(ROUTER)], {t.name: t for t in plan}


def patch_gguf(tuned_dir, base_gguf, out):
    """Copy base_gguf to out with every router tensor replaced by tuned_dir's. Returns a summary."""
    out = check_output(out, "--gguf", [tuned_dir, base_gguf])
    reader = read_gguf(base_gguf)
    if (gguf_value(reader, "split.count") or 1) > 1:
        raise UserError(f"--patch-gguf {base_gguf}: one part of a split GGUF; merge it first "
                        f"(llama-gguf-split --merge)")
    cfg = read_config(tuned_dir)
    plan = gguf_tensors(cfg, checkpoint_state(tuned_dir))
    routers, by_name = check_same_model(reader, base_gguf, cfg, tuned_dir, plan)
    new = {}
    for g in routers:  # encode every router before writing anything: a failure leaves no file
        qtype = gguf.GGMLQuantizationType(g.tensor_type)
        try:
            new[g.name] = encode(by_name[g.name].get(), qtype).tobytes()
        except (NotImplementedError, gguf.QuantError):
            raise UserError(f"--patch-gguf {base_gguf}: {g.name} is stored as {qtype.name}, "
                            f"which the gguf package cannot write") from None
        assert len(new[g.name]) == g.n_bytes, (g.name, len(new[g.name]), g.n_bytes)
    size, chunk = os.path.getsize(base_gguf), 1 << 24
    t0 = time.perf_counter()
    with atomic_write(out) as tmp:
        with open(base_gguf, "rb") as src, open(tmp, "wb") as dst, \
                tqdm(total=size, unit="B", unit_scale=True, desc=f"patch {Path(out).name}") as bar:
            while block := src.read(chunk):
                dst.write(block)
                bar.update(len(block))
            for g in routers:  # same type and size as the base's router: nothing else moves
                dst.seek(int(g.data_offset))
                dst.write(new[g.name])
    summary = (f"{out}: {base_gguf} with {len(routers)} router tensors ({sum(map(len, new.values())) / 1e3:.1f} KB) "
               f"from {tuned_dir}; every other byte unchanged ({size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s)")
    if unsupported(cfg):  # the base GGUF already runs this way; the patch changes nothing about it
        summary += f"\nnote: llama.cpp will not route exactly as model.py: {unsupported(cfg)}"
    return summary


# ----------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = ArgumentParser(description="Export a model.py checkpoint (e.g. a ReMoE-tuned one) to a GGUF that "
                                            "llama.cpp runs, or patch its routers into an existing GGUF.")
    p.add_argument("model", help="model folder in Hugging Face layout (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--gguf", metavar="OUT.gguf", help="the GGUF file to write (required; written atomically)")
    p.add_argument("--dtype", default=None, help=f"weight type of a full export: {', '.join(DTYPES)} (default: the "
                                                 "checkpoint's own, bf16 for FP8); routers, norms, biases stay f32")
    p.add_argument("--patch-gguf", metavar="BASE.gguf", default=None,
                   help="instead of a full export, copy this GGUF of the base model and replace only its "
                        "router tensors (ffn_gate_inp) with MODEL's")
    args = p.parse_args(argv)
    with user_errors(), fatal_errors():
        if not args.gguf:
            raise UserError("--gguf OUT.gguf is required: the file to write")
        if args.patch_gguf:
            if args.dtype:
                raise UserError("--dtype applies to a full export; --patch-gguf keeps the base GGUF's tensor types")
            summary = patch_gguf(args.model, args.patch_gguf, args.gguf)
        else:
            summary = export_gguf(args.model, args.gguf, args.dtype)
    print(summary)


if __name__ == "__main__":
    main()
