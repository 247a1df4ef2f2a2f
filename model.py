"""
model.py: a fine-grained Mixture-of-Experts transformer written out by hand. DeepSeek-V2/V3, Qwen2-MoE,
Qwen3-MoE, OLMoE and Mixtral are one decoder (embed, blocks of attention + FFN, norm, head) whose FFNs
are mostly a router (`Gate`) that picks the top-k of E small experts per token, plus optional shared
experts. They differ in details that are fields of `ModelConfig`: the attention (MLA for DeepSeek,
grouped-query with or without q/k norms for the others), the router's score (softmax or sigmoid), how
the top-k is chosen and how its weights are scaled. The forward pass returns, on request, every MoE
layer's routing: what ReMoE trains (router.py, train.py) and what an expert cache sees (cache.py). The
routed experts come from a provider (`Experts`), which offload_infer.py replaces with a cache.

Follows DeepSeek-V2 (arXiv:2405.04434), DeepSeek-V3 (arXiv:2412.19437) and YaRN (arXiv:2309.00071);
checkpoint.py loads the weights (parity with transformers 5.23). Leaves out padding masks, sliding
windows, dropout and tensor parallelism.

Shapes: B batch, T tokens (S with the KV cache), D hidden, H heads, KV key/value heads, hd head dim,
N = B*T flattened tokens, E routed experts, K top-k, F expert width, V vocab.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass for every architecture (checkpoint.py fills it from config.json)

@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # attention (grouped-query; MLA uses the block below instead)
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 0
    qkv_bias: bool = False            # Qwen2-MoE: biases on q, k, v
    o_bias: bool = False
    qk_norm: str = "none"             # "head": RMSNorm per head (Qwen3); "proj": over the whole projection (OLMoE)
    clip_qkv: float | None = None     # OLMoE option, null in the published model
    # multi-head latent attention (DeepSeek)
    mla: bool = False
    q_lora_rank: int | None = None    # None: one q_proj; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False     # DeepSeek stores rope dims as (x0, x1), (x2, x3), ... pairs
    # rope
    rope_theta: float = 10000.0
    rope_type: str = "default"        # "default" or "yarn"
    rope_parameters: dict = field(default_factory=dict)
    # feed-forward and experts
    intermediate_size: int = 0        # dense MLP width
    moe_intermediate_size: int = 0    # routed expert width F
    n_routed_experts: int = 0         # E
    num_experts_per_tok: int = 0      # K
    shared_intermediate_size: int = 0  # width of the shared expert(s); 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: shared expert scaled by sigmoid(shared_expert_gate(x))
    moe_layers: list = field(default_factory=list)
    num_nextn_predict_layers: int = 0  # DeepSeek-V3: multi-token-prediction layers stored after the decoder, not run
    # routing
    scoring_func: str = "softmax"     # "softmax" (most) or "sigmoid" (DeepSeek-V3)
    topk_method: str = "greedy"       # "greedy", "group_limited_greedy" (V2), "noaux_tc" (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_logits_fp32: bool = False  # DeepSeek computes router logits in fp32, the others in model dtype
    router_weights_fp32: bool = True  # Qwen/OLMoE cast the top-k weights back to model dtype
    # checkpoint format
    fp8_block: tuple = (128, 128)     # DeepSeek-V3 FP8 weights: one scale per block of this shape

    @property
    def attn_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.mla else self.head_dim



# ----------------------------------------------------------------------------------------------
# Building blocks: RMSNorm, rotary embeddings, attention (GQA and MLA), MLP

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32:  # the same arithmetic in one call: fewer dispatches per decode token
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32, cast back *before* the weight: the order transformers uses (matters in bf16)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(cfg, dim):
    """Inverse frequencies of the `dim` rotary dims and the cos/sin attention factor (YaRN or plain)."""
    theta = cfg.rope_theta
    base = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    if cfg.rope_type != "yarn":
        return base, 1.0
    # YaRN: keep high-frequency dims, interpolate low-frequency ones by `factor`, ramp in between
    p = cfg.rope_parameters
    factor, L0 = p["factor"], p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_of(rotations):  # the rotary dim that turns `rotations` times over the original context
        return dim * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = base / factor * ramp + base * (1 - ramp)
    factor_attn = p.get("attention_factor")
    if factor_attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        factor_attn = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, factor_attn


def yarn_mscale(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x, rot, interleaved):
    """Rotate x [B, H, T, d] by position: each pair of dims (x1, x2) turns by its frequency's angle,
    (x1 cos - x2 sin, x1 sin + x2 cos), with rot = (a cos, a sin), each (T, d/2), in fp32. The interleaved
    layout pairs (x_2i, x_2i+1), as DeepSeek stores its rope dims; the half layout pairs (x_i, x_{i+d/2})
    (NeoX, Qwen, OLMoE, Mixtral). Real arithmetic, not complex numbers, so that torch.compile can fuse it."""
    cos, sin = rot
    xf = x if x.dtype == torch.float32 else x.float()
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else xf.chunk(2, dim=-1)  # (B, H, T, d/2) each
    r1, r2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    out = torch.stack((r1, r2), dim=-1).flatten(-2) if interleaved else torch.cat((r1, r2), dim=-1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def attend(q, k, v, scale, visible=None):
    """Attention of q [B, H, T, hd] over k, v [B, KV, S, hd], where each group of H/KV query heads reads
    one key/value head (query head h reads head h // (H/KV), as grouped-query attention and MLA's single
    latent head need). Which keys a query sees: `visible` (T, S) bool when given (a fixed-size cache's
    mask), else causal, the last T of the S positions being the queries'."""
    (B, H, T, _), (KV, S) = q.shape, k.shape[1:3]
    if T == 1:
        # decoding: the one query sees every key; the G = H/KV query heads of a key/value head are rows
        # of one matmul (for tiny heads two matmuls cost less than one fused call's dispatch)
        q = q.reshape(B, KV, H // KV, q.shape[-1])  # (B, KV, G, hd)
        scores = q @ k.transpose(-1, -2)  # (B, KV, G, S)
        scores = scores * scale if scores.dtype == torch.float32 else scores.float() * scale
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        return (torch.softmax(scores, dim=-1).to(v.dtype) @ v).reshape(B, H, 1, v.shape[-1])
    if KV != H:
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, S, hd)
    if visible is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if visible is None:  # a chunk after a cached prefix: query t sees keys 0 .. S-T+t
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


class KVCache:
    """What attention keeps of the tokens seen so far, per layer, in buffers that grow by doubling (so
    a decode step writes one position instead of copying the history); `length` is the next
    token's position. GQA layers keep keys and values, MLA layers their small latent."""

    visible = None  # every position kept so far is in the past of the new tokens: attention is causal

    def __init__(self, reserve=16):
        self.buffers, self.length, self.reserve = {}, 0, reserve  # positions allocated by the first update

    def positions(self, T, device):
        """(positions of the next T tokens (T,), an upper bound on them): what rotary embeddings need."""
        return torch.arange(self.length, self.length + T, device=device), self.length + T

    def advance(self, T):
        self.length += T

    def update(self, layer, *new):
        """Write `new` tensors [..., T, d] at positions length .. length+T-1 of `layer`'s buffers and
        return views of the whole history [..., S, d], S = length + T."""
        start, end = self.length, self.length + new[0].shape[-2]
        old = self.buffers.get(layer)
        if old is None or old[0].shape[-2] < end:
            size = max(end, 2 * old[0].shape[-2] if old else self.reserve)
            grown = [t.new_empty(*t.shape[:-2], size, t.shape[-1]) for t in new]
            for g, o in zip(grown, old or []):
                g[..., :start, :] = o[..., :start, :]
            self.buffers[layer] = old = grown
        for buf, t in zip(old, new):
            buf[..., start:end, :] = t
        return [buf[..., :end, :] for buf in old]


class StaticKVCache:
    """A KV cache of fixed size `max_len` whose position lives in a tensor: a decode step then has the
    same shapes and reads no Python number that changes from token to token, which is what lets
    torch.compile compile it once (offload_infer.py --compile). The caller moves it with `seek`, outside
    the compiled step; attention reads all max_len positions and `visible` masks those not written yet.
    A one-token step always reads the same position and mask tensors, rewritten in place by `seek`, so
    that on CUDA the step can also be recorded once as a CUDA graph and replayed."""

    def __init__(self, max_len, device):
        self.max_len, self.device, self.buffers = max_len, device, {}
        self.length = 0  # positions written once the pass being run is done
        self.pos = self.visible = None
        self.all_positions = torch.arange(max_len, device=device)
        self.per_length = {}  # T -> (positions (T,), mask (T, max_len)): one pair per pass length, kept

    def seek(self, position, T):
        """The next forward pass writes T tokens at positions position .. position+T-1 (for the next token
        in order: seek(cache.length, T))."""
        if position + T > self.max_len:
            raise ValueError(f"StaticKVCache holds {self.max_len} positions, asked for {position + T}")
        self.length = position + T
        if T not in self.per_length:
            self.per_length[T] = (torch.empty(T, dtype=torch.long, device=self.device),
                                  torch.empty(T, self.max_len, dtype=torch.bool, device=self.device))
        self.pos, self.visible = self.per_length[T]
        torch.arange(position, position + T, out=self.pos)
        torch.le(self.all_positions, self.pos[:, None], out=self.visible)

    def positions(self, T, device):
        if self.pos is None or self.pos.shape[0] != T:
            raise ValueError(f"StaticKVCache: call seek(position, {T}) before a pass of {T} tokens")
        return self.pos, self.max_len

    def advance(self, T):
        pass  # a compiled step must not change Python state: the caller seeks before the next pass

    def update(self, layer, *new):
        """Write `new` tensors [..., T, d] at this pass's positions; returns the whole buffers [..., max_len, d]
        (allocated by the first pass, which should run uncompiled)."""
        if layer not in self.buffers:
            self.buffers[layer] = [t.new_zeros(*t.shape[:-2], self.max_len, t.shape[-1]) for t in new]
        for buf, t in zip(self.buffers[layer], new):
            buf.index_copy_(-2, self.pos, t)
        return self.buffers[layer]


class Attention(nn.Module):
    """Grouped-query attention (Qwen2/3-MoE, OLMoE, Mixtral), with the optional q/k norms."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        H, KV, hd, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, KV * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.o_bias)
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(hd if per_head else H * hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd if per_head else KV * hd, cfg.rms_norm_eps)

    def forward(self, x, rot, kv_cache=None):
        cfg, (B, T, _) = self.cfg, x.shape
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "proj":  # OLMoE: one norm over all heads' features, before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
        if cfg.qk_norm == "head":  # Qwen3: a norm per head over hd, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, hd)
        q, k = apply_rope(q, rot, False), apply_rope(k, rot, False)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, KV, S, hd)
        y = attend(q, k, v, hd ** -0.5, kv_cache.visible if kv_cache is not None else None)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a small latent c_kv,
    plus one rotary key shared by all heads; queries optionally pass through their own low-rank latent."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        H, D, hd = cfg.num_attention_heads, cfg.hidden_size, cfg.attn_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * hd, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps fixed at 1e-6, as in the reference code
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.o_bias)
        # YaRN stretches attention logits too: softmax scale times mscale(factor, mscale_all_dim)^2
        self.scale = hd ** -0.5
        m_all = cfg.rope_parameters.get("mscale_all_dim")
        if cfg.rope_type == "yarn" and m_all:
            self.scale *= yarn_mscale(cfg.rope_parameters["factor"], m_all) ** 2

    def forward(self, x, rot, kv_cache=None):
        cfg, (B, T, _) = self.cfg, x.shape
        H, dn, dr, dv, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, dn + dr).transpose(1, 2)  # (B, H, T, dn+dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, r): the compressed keys and values
        q_pe = apply_rope(q_pe, rot, cfg.rope_interleave)
        k_pe = apply_rope(k_pe.view(B, 1, T, dr), rot, cfg.rope_interleave)  # one rope key for all heads
        if kv_cache is None:  # a whole sequence (training, evaluation): expand keys and values per head
            kv = self.kv_b_proj(latent).view(B, T, H, dn + dv).transpose(1, 2)
            k_nope, v = kv.split([dn, dv], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
            k = torch.cat([k_nope, k_pe.expand(B, H, T, dr)], dim=-1)  # (B, H, T, dn+dr)
            y = attend(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale)  # (B, H, T, dv)
        else:
            # with a cache, keep only the latent and the rope key (r + dr numbers per token instead of
            # H x (dn + dr + dv)), and absorb kv_b_proj = [W_uk; W_uv] into the query and the output:
            # q_nope . (W_uk c) = (W_uk^T q_nope) . c, and sum_s a_s W_uv c_s = W_uv (sum_s a_s c_s)
            W = self.kv_b_proj.weight.view(H, dn + dv, r)
            q_lat = q_nope @ W[:, :dn]  # (B, H, T, dn) @ (H, dn, r) -> (B, H, T, r)
            keys = kv_cache.update(self.layer, torch.cat([latent.unsqueeze(1), k_pe], dim=-1))[0]  # (B, 1, S, r+dr)
            y = attend(torch.cat([q_lat, q_pe], dim=-1), keys, keys[..., :r], self.scale, kv_cache.visible)  # (B, H, T, r)
            y = y @ W[:, dn:].transpose(1, 2)  # (B, H, T, r) @ (H, r, dv) -> (B, H, T, dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * dv))


def swiglu(x, gate, up, down):
    """SwiGLU feed-forward, down (silu(gate x) * up x), for x (..., n, D), gate and up (..., F, D), down
    (..., D, F): the dense FFN, every routed expert and the shared experts have this form. Leading weight
    dims batch several experts at once (offload_infer.py computes a token's K experts so)."""
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT


PROJS = ("gate_proj", "up_proj", "down_proj")  # an expert's matrices, in swiglu's order


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


# ----------------------------------------------------------------------------------------------
# The router (`gate`) and the MoE layer

class Routing(NamedTuple):
    """One MoE layer's decisions for every token: what router.py learns from and cache.py replays."""
    layer: int             # decoder layer index
    indices: torch.Tensor  # (B, T, K) chosen expert ids
    weights: torch.Tensor  # (B, T, K) their combine weights
    scores: torch.Tensor   # (B, T, E) router scores: softmax probabilities, or sigmoid scores (V3)


def guaranteed_topk(choice, k, cached, keep, margin):
    """Cache-aware top-k with a guarantee (colibri's CACHE_ROUTE): the true top-`keep` experts are always
    chosen, and each of the other k - keep slots goes to the best cached expert scoring at least s_k - margin
    (s_k the true k-th best score), else to the best expert left. choice (N, E), cached (E,) or (N, E) bool ->
    (N, k), best first. keep = k, or margin 0 (no cached expert outside the top-k qualifies), is plain top-k."""
    top = choice.topk(k, dim=-1).indices                                   # (N, k) the true top-k
    kept = torch.zeros_like(choice, dtype=torch.bool).scatter_(-1, top[:, :keep], True)  # (N, E) the true top-J
    close = cached & ~kept & (choice >= choice.gather(-1, top[:, -1:]) - margin)  # (N, E) cached, within the margin
    # rank by (tier, score): the kept first, then the close cached ones, then the rest; the first k are chosen
    tier = 2 * kept.long() + close.long()                                  # (N, E)
    by_score = choice.argsort(dim=-1, descending=True, stable=True)        # (N, E) expert ids, best first
    places = tier.gather(-1, by_score).argsort(dim=-1, descending=True, stable=True)[:, :k]  # (N, k) in by_score
    return by_score.gather(-1, places.sort(dim=-1).values)                 # (N, k), best first as topk


def routing_drift(scores, true, used, eps=1e-6):
    """How far cache-aware routing moved each token from its own routing: (agreement, kl), each (N,).
    agreement: the fraction of the used experts `used` (N, K) that are in the true top-k `true` (N, K).
    kl: KL(p_true || p_used) over the union U of the two sets, p a set's scores (N, E) normalised to sum 1
    (the combine weights' own rule), smoothed to (p + eps) / (1 + eps |U|) so that a swap costs a finite amount."""
    def member(idx):  # (N, E) bool
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)

    in_true, in_used = member(true), member(used)
    union = in_true | in_used                                              # (N, E)
    size = union.sum(-1, keepdim=True)                                     # (N, 1) |U|
    p, q = (torch.where(m, scores, 0.0) for m in (in_true, in_used))       # (N, E) each set's scores
    p, q = ((s / s.sum(-1, keepdim=True) + eps) / (1 + eps * size) for s in (p, q))
    kl = torch.where(union, p * (p / q).log(), 0.0).sum(-1)                # (N,)
    return (in_true & in_used).sum(-1) / true.shape[-1], kl


class Gate(nn.Module):
    """The router: scores every expert for every token and picks K of them. The only module ReMoE trains."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            # DeepSeek-V3's load-balancing bias: shifts which experts are chosen, never their weights
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x, bonus=None, cached=None, keep=None, margin=0.0):
        """x (N, D) -> indices (N, K), weights (N, K), scores (N, E). Cache-aware routing (offload_infer.py)
        steers the choice, never the weights (the scores of the chosen experts), in one of two ways.
        `bonus` (E,) is added to the scores used for the choice (like V3's bias, and before group limiting,
        so a favoured expert's group is favoured too). With `cached` (E,) or (N, E) bool and `keep` J, the
        choice is guaranteed_topk's: the true top-J always, the other K - J slots preferring cached experts
        within `margin` of the K-th best score."""
        cfg = self.cfg
        if cfg.router_logits_fp32 and x.dtype != torch.float32:
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight)
            logits = logits if logits.dtype == torch.float32 else logits.float()
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)  # (N, E)
        choice = scores
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        if bonus is not None:
            choice = choice + bonus
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
            # experts form n_group contiguous groups; only the topk_group best groups may be chosen
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # (N, G, E/G)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # V3: sum of each group's best two
            else:
                group_score = grouped.max(dim=-1).values  # V2: each group's best expert
            best = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
            kept = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            dropped = (~kept).unsqueeze(-1).expand_as(grouped).reshape_as(choice)  # (N, E)
            choice = choice.masked_fill(dropped, float("-inf") if cfg.topk_method == "noaux_tc" else 0.0)
            cached = cached & ~dropped if cached is not None else None  # a dropped group stays dropped
        if cached is not None and keep is not None and keep < cfg.num_experts_per_tok:
            indices = guaranteed_topk(choice, cfg.num_experts_per_tok, cached, keep, margin)  # (N, K), best first
        else:
            indices = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, K), best first
        weights = scores.gather(-1, indices)  # the unbiased scores of the chosen experts
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        if not cfg.router_weights_fp32:
            weights = weights.to(x.dtype)
        return indices, weights, scores


def run_experts(x, indices, weights, experts):
    """Reference MoE combine: y_t = sum_j w_tj * expert_{i_tj}(x_t). The layer asks its experts
    provider for the experts these routing decisions need, and runs each once on all of its tokens.
    x (N, D), indices and weights (N, K)."""
    y = torch.zeros_like(x)
    if x.shape[0] == 1:  # one token (decoding): its K experts, each with its weight, no token bookkeeping
        weight_of = dict(zip(indices[0].tolist(), weights[0].tolist()))
        for e, expert in experts.fetch(indices, x):
            y.add_(expert(x), alpha=weight_of[e])
        return y
    for e, expert in experts.fetch(indices, x):
        token, slot = torch.where(indices == e)  # which tokens chose e, and in which of their K slots
        out = expert(x[token]) * weights[token, slot, None]  # (n_e, D)
        y.index_add_(0, token, out.to(x.dtype))
    return y


def run_experts_grouped(x, indices, weights, experts, padded=None):
    """The same combine as run_experts, with the N*K (token, expert) pairs sorted by expert once, so a layer
    reads one thing back from the device instead of syncing once per expert. Padded (the default on a GPU):
    every expert in one batched SwiGLU over a batch (E, C, D), C the busiest expert's count, the one number
    read back. Otherwise (the CPU, where the padding costs more than the launches it saves) each expert runs
    on its slice of the sorted tokens, the E counts read back at once. x (N, D), indices and weights (N, K)."""
    (N, K), E = indices.shape, len(experts)
    expert = indices.reshape(-1)                                    # (N*K,) the expert of each pair
    order = expert.argsort(stable=True)                             # pairs grouped by expert
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, expert, torch.ones_like(expert))
    token = order // K                                              # (N*K,) the token of each sorted pair
    if x.device.type != "cpu" if padded is None else padded:
        gate, up, down = (torch.stack([getattr(mlp, p).weight for mlp in experts]) for p in PROJS)  # (E, ., .)
        expert = expert[order]                                      # (N*K,) sorted
        rank = torch.arange(N * K, device=x.device) - (counts.cumsum(0) - counts)[expert]  # place in its group
        batch = x.new_zeros(E, int(counts.max()), x.shape[1])       # (E, C, D): the one host sync
        batch[expert, rank] = x[token]
        out = swiglu(batch, gate, up, down)[expert, rank]          # (N*K, D)
    else:
        slices = x[token].split(counts.tolist())                    # the one host sync: E counts
        out = torch.cat([mlp(xs) for mlp, xs in zip(experts, slices) if len(xs)])  # (N*K, D)
    out = out * weights.reshape(-1)[order, None]                    # each pair's combine weight
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


class Experts(nn.ModuleList):
    """The E routed experts of one MoE layer, all in memory: the resident experts provider.
    A provider answers three questions of the MoE layer: how to steer the router's top-k (Gate's keyword
    arguments; nothing here), "give me these experts", and "what do these experts add to x" (here the
    reference loop, run_experts). offload_infer.py swaps in a provider with the same three methods that
    holds a few experts in a cache and reads the others from disk, so the decoder loop and this layer
    exist once. Several tokens at once (training, a prompt) take the grouped path, run_experts_grouped;
    `grouped=False` keeps the reference loop, the readable definition the grouped path is tested against."""

    def __init__(self, experts=(), grouped=True, padded=None):
        super().__init__(experts)
        self.grouped, self.padded = grouped, padded  # padded None: on a GPU padded, on the CPU sliced

    def steer(self):
        return {}

    def fetch(self, indices, x):
        """(expert id, expert) for every expert that `indices` (N, K) selects, in ascending id order."""
        if len(self) == 0:
            raise RuntimeError("routed experts were left on disk (experts_on_disk=True); decode with offload_infer.py")
        for e in sorted(set(indices.flatten().tolist())):
            yield e, self[e]

    def run(self, x, indices, weights):
        """The routed part of the layer's output for x (N, D): sum over k of weights * expert(x)."""
        if self.grouped and x.shape[0] > 1 and len(self):
            return run_experts_grouped(x, indices, weights, self, self.padded)
        return run_experts(x, indices, weights, self)


class MoE(nn.Module):
    """Router + routed experts + shared experts. Module names equal the checkpoint's tensor names."""

    def __init__(self, cfg, layer, experts_on_disk=False):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        D = cfg.hidden_size
        self.gate = Gate(cfg)
        self.route = None  # None: the gate routes all tokens at once; cache.steered sets a cache-aware loop
        # with experts_on_disk the list stays empty: offload_infer.py gives the layer a provider of its own
        self.experts = Experts(
            [] if experts_on_disk else [MLP(D, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)])
        if cfg.shared_expert_gate:  # Qwen2-MoE: one wide shared expert with a per-token sigmoid gate
            self.shared_expert = MLP(D, cfg.shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)
        elif cfg.shared_intermediate_size:  # DeepSeek: n_shared_experts fused into one MLP
            self.shared_experts = MLP(D, cfg.shared_intermediate_size)

    def shared(self, x):
        """The always-on part of the layer (zero when the architecture has none)."""
        if self.cfg.shared_expert_gate:
            return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.cfg.shared_intermediate_size:
            return self.shared_experts(x)
        return torch.zeros_like(x)

    def forward(self, x):  # x (B, T, D)
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        if self.route is not None:  # training under the device's cache-aware routing (cache.steered)
            indices, weights, scores = self.route(self.gate, x)
        else:
            indices, weights, scores = self.gate(flat, **self.experts.steer())  # (N, K), (N, K), (N, E)
        y = self.experts.run(flat, indices, weights) + self.shared(flat)
        K = indices.shape[-1]
        routing = Routing(self.layer, indices.view(B, T, K), weights.view(B, T, K), scores.view(B, T, -1))
        return y.view(B, T, D), routing


class Block(nn.Module):
    def __init__(self, cfg, layer, experts_on_disk=False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer) if cfg.mla else Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        is_moe = layer in cfg.moe_layers
        self.mlp = MoE(cfg, layer, experts_on_disk) if is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rot, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rot, kv_cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, routing = self.mlp(h)
            return x + h, routing
        return x + self.mlp(h), None


class Decoder(nn.Module):
    """Holds the tensors under `model.` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg, experts_on_disk=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg, l, experts_on_disk) for l in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg, experts_on_disk=False):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg, experts_on_disk)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # trade compute for memory when training: recompute each block in the backward pass
        self.gradient_checkpointing = False
        self.rope_tables = {}  # device -> (cos, sin) of every position so far, see `rope`

    def moes(self):
        """The MoE layers (router + experts) in decoder order."""
        return [block.mlp for block in self.model.layers if isinstance(block.mlp, MoE)]

    def rope(self, positions, end):
        """rot = (a cos, a sin), each (T, rope_dim/2) in fp32, for the given positions (T,), all below `end`
        (a: YaRN's attention factor, else 1). A table of every position below `end` is kept per device (a
        pure function's memo), so that a step gathers its rows."""
        table = self.rope_tables.get(positions.device)
        if table is None or table[0].shape[0] < end:
            cfg = self.config
            inv_freq, factor = rope_frequencies(cfg, cfg.qk_rope_head_dim if cfg.mla else cfg.head_dim)
            pos = torch.arange(max(end, 2 * table[0].shape[0] if table is not None else 256), dtype=torch.float32)
            angles = torch.outer(pos, inv_freq)  # (P, rope_dim/2)
            table = tuple((t * factor).to(positions.device) for t in (angles.cos(), angles.sin()))
            self.rope_tables[positions.device] = table
        return table[0][positions], table[1][positions]

    def forward(self, input_ids, return_routing=False, kv_cache=None):
        """input_ids (B, T) -> logits (B, T, V), and with return_routing a list of Routing, one per MoE layer."""
        T = input_ids.shape[1]
        positions, end = kv_cache.positions(T, input_ids.device) if kv_cache is not None else (
            torch.arange(T, device=input_ids.device), T)
        rot = self.rope(positions, end)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        routing = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute:
                x, r = torch.utils.checkpoint.checkpoint(block, x, rot, kv_cache, use_reentrant=False)
            else:
                x, r = block(x, rot, kv_cache)
            if r is not None:
                routing.append(r)
        logits = self.lm_head(self.model.norm(x))
        if kv_cache is not None:
            kv_cache.advance(T)
        return (logits, routing) if return_routing else logits



# ----------------------------------------------------------------------------------------------
# Generation

def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next token ids (B, 1) from last-position logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return order.gather(-1, choice)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, generator=None):
    """Prefill the prompt once, then decode one token at a time with the KV cache. Returns (B, T+new)."""
    cache = KVCache()
    logits = model(input_ids, kv_cache=cache)[:, -1]
    tokens = [input_ids]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        tokens.append(nxt)
        if i + 1 < max_new_tokens:
            logits = model(nxt, kv_cache=cache)[:, -1]
    return torch.cat(tokens, dim=1)


def count_parameters(model):
    """(total, active per token): active counts K of E routed experts in every MoE layer."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = len(cfg.moe_layers) * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    return total, total - inactive


