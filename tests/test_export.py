"""Tests for export.py, with llama.cpp itself as the oracle (llama-cpp-python 0.3.36, a test-only
dependency that .ci/run builds): for every architecture variant that llama.cpp can represent, the
exported GGUF must load in stock llama.cpp, tokenize text as the tokenizer does, give model.py's
logits within a stated tolerance and model.py's greedy tokens; the variants it cannot represent must
be refused with the reason. Patch mode must change only the router bytes of a base GGUF (also one
quantized by llama.cpp's own quantizer), and the patched file must run the tuned model. Bad input
ends in one `error:` line.

The checkpoints are built here rather than taken from conftest's `tiny` (vocab 160): a byte-level
BPE tokenizer needs its 256 byte tokens plus merges, so these have vocab 320.
"""
import json
import shutil

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import export  # noqa: E402  (after the skips: export.py needs gguf)
import checkpoint as hf_format
import cli
import model  # noqa: E402
from data import train_tokenizer  # noqa: E402
from tiny import (VARIANT_IDS, VARIANTS, assert_cli_errors, make_checkpoint, read_config, read_tensors,  # noqa: E402
                  tiny_config, write_checkpoint, yarn)

VOCAB = 320
N_CTX = 128
NEW_TOKENS = 32
PROMPT = 'def heappush(heap, item):\n    """Push item onto heap, maintaining the heap invariant."""\n'
TEXTS = [PROMPT, "naïve café — 日本語, ünïcödé!\n\t  x = 12345 + 0.5e-3  # don't, we'll\r\n",
         "    \n\n   trailing   spaces   ", "CamelCase snake_case 3.14159 ... ??!! 'quoted' \"double\""]

# Tolerances for llama.cpp's logits against model.py's (float32 on both sides), per position of a
# 67-token sequence (|logits| up to 5.1 in these models). Measured, max over the variants:
#  - K/V cache in float32: 5.2e-6. What remains is summation order (ggml's blocked dot products vs
#    torch's) and ggml's vectorised exp/silu, each ~1e-7 relative per operation; the routing is the
#    same at every position. Bound 5e-5 (10x), at every position.
#  - K/V cache in float16, llama.cpp's default: 1.0e-3 to 4.3e-3. Every key and value (for MLA the
#    cached latent and rope key) is rounded to an 11-bit mantissa, a relative error up to 2^-11 = 4.9e-4
#    per element that attention and the later layers carry into the logits. Bound 1.5e-2 (3.5x). That
#    rounding can also break a near-tie between two experts the other way, which moves that one position
#    by a routing flip's amount (0.24 was seen on a 32-expert model), so this bound holds for 95% of the
#    positions. A wrong tensor layout or key gives errors of order 1 at most positions (3.5 was seen).
TOL_KV_F32 = 5e-5
TOL_KV_F16 = 1.5e-2
GGML_TYPE_F32 = 0

# The variants of tiny.py that llama.cpp cannot represent, and the reason export.py gives.
REFUSED = {
    "ds2-group-limited": "sum of each group's best two scores",
    "qwen2-sparse-step2": "makes every layer MoE",
    "qwen2-mlp-only": "makes every layer MoE",
    "qwen2-norm-topk": "never renormalises",
    "olmoe-clip-qkv": "does not clamp q, k, v",
}
# tiny.py covers Qwen2-MoE only through variants llama.cpp refuses, and YaRN only with MLA (whose rope and
# attention scaling llama.cpp computes on its own path): a plain Qwen2-MoE, and a Qwen3-MoE with YaRN.
EXTRA_VARIANTS = {
    "qwen2-moe": ("qwen2_moe", {}),
    "qwen3-yarn": ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                      "original_max_position_embeddings": 32}}),
}
EXPORTED = [vid for vid in VARIANT_IDS if vid not in REFUSED] + list(EXTRA_VARIANTS)
PATCHED = ["ds2-mla-greedy", "ds3-noaux-norm", "mixtral-gqa"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    """A byte-level BPE like the default model's (data.train_tokenizer), with at most VOCAB tokens."""
    return train_tokenizer([corpus.read_text()], VOCAB)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """Factory `checkpoint(variant_id, **overrides) -> folder` with tokenizer.json, built once each."""
    cache = {}

    def get(vid, **overrides):
        key = (vid, tuple(sorted(overrides.items())))
        if key not in cache:
            arch, base = {**VARIANTS, **EXTRA_VARIANTS}[vid]
            path = tmp_path_factory.mktemp(vid)
            make_checkpoint(path, arch, vocab_size=VOCAB, **{**base, **overrides})
            tokenizer.save(str(path / "tokenizer.json"))
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """Factory `exported(variant_id, dtype="f32") -> GGUF path`, written once each."""
    cache = {}

    def get(vid, dtype="f32"):
        if (vid, dtype) not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"{vid}-{dtype}.gguf"
            export.export_gguf(checkpoint(vid), out, dtype)
            cache[vid, dtype] = out
        return cache[vid, dtype]

    return get


def llama(path, **kw):
    """Stock llama.cpp on one thread (deterministic), logits kept for every position."""
    return llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, logits_all=True,
                           verbose=False, **kw)


def llama_logits(llm, ids):
    """llama.cpp's logits (T, V) for the given tokens, evaluated as one batch (llama.cpp's eval)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def llama_greedy(llm, prompt_ids, n):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def reference(path, tokenizer):
    """model.py's prompt ids, greedy sequence (prompt + NEW_TOKENS) and its logits (T, V), float32."""
    net = hf_format.load_model(path)
    prompt = tokenizer.encode(PROMPT).ids
    seq = model.generate(net, torch.tensor([prompt]), NEW_TOKENS)[0]
    with torch.no_grad():
        logits = net(seq[None])[0].double().numpy()
    return prompt, seq.tolist(), logits


def check_greedy(ours, theirs, ref_logits, n_prompt, tie):
    """Greedy tokens must be equal, unless model.py's best two logits at the first differing step are
    closer than `tie` (a near-tie that a difference of that size may break either way; after it the
    two continuations legitimately diverge). Returns how many tokens are equal."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            top2 = np.sort(ref_logits[n_prompt + i - 1])[-2:]
            assert top2[1] - top2[0] < tie, (
                f"greedy token {i} differs ({a} vs {b}) with a logit gap of {top2[1] - top2[0]:.3g} >= {tie:.3g}")
            return i
    return len(ours)


# ---------------------------------------------------------------------------- full export, per variant


def test_every_variant_is_exported_or_refused():
    """Each of tiny.py's variants is either checked against llama.cpp below or expected to be refused."""
    assert set(REFUSED) <= set(VARIANT_IDS) and set(VARIANT_IDS) - set(REFUSED) <= set(EXPORTED)


@pytest.mark.parametrize("vid", EXPORTED)
def test_llama_cpp_tokenizes_as_the_tokenizer(vid, exported, tokenizer):
    llm = llama_cpp.Llama(str(exported(vid)), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
        assert llm.detokenize(ids).decode() == text
    text = "a<|endoftext|>b"  # the special token: tokenizers always matches it, llama.cpp when asked to
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text).ids
    assert llm.n_vocab() == VOCAB and llm.token_eos() == 2


@pytest.mark.parametrize("vid", EXPORTED)
def test_llama_cpp_logits_and_greedy_tokens_equal_model_py(vid, checkpoint, exported, tokenizer):
    prompt, seq, ref = reference(checkpoint(vid), tokenizer)
    llm = llama(exported(vid), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    err = np.abs(llama_logits(llm, seq) - ref).max(axis=1)  # per position
    assert err.max() <= TOL_KV_F32, f"{vid}, f32 K/V: max |logit diff| {err.max():.3g} > {TOL_KV_F32:g}"
    check_greedy(seq[len(prompt):], llama_greedy(llm, prompt, NEW_TOKENS), ref, len(prompt), 2 * TOL_KV_F32)
    llm = llama(exported(vid))  # llama.cpp's defaults: f16 K/V
    err = np.abs(llama_logits(llm, seq) - ref).max(axis=1)
    assert np.quantile(err, 0.95) <= TOL_KV_F16, f"{vid}, f16 K/V: |logit diff| {np.sort(err)[-5:]} > {TOL_KV_F16:g}"
    check_greedy(seq[len(prompt):], llama_greedy(llm, prompt, NEW_TOKENS), ref, len(prompt), 2 * err.max())


@pytest.mark.parametrize("vid", sorted(REFUSED))
def test_variants_llama_cpp_cannot_represent_are_refused(vid, checkpoint, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(cli.UserError, match=REFUSED[vid]):
        export.export_gguf(checkpoint(vid), out)
    assert list(tmp_path.iterdir()) == []


def test_rope_pairs_interleaved_by_hand():
    """Mixtral rotates (x0, x2) and (x1, x3) of a 4-dim head, llama.cpp's llama (x0, x1) and (x2, x3): the
    rows of each head are reordered 0, 2, 1, 3, and the q.k products stay the same."""
    w = torch.arange(8.0).view(8, 1)  # two heads of 4 rows
    assert export.rope_pairs_interleaved(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_yarn_factors_by_hand():
    """With g(m) = 1 + 0.1 m ln 40: DeepSeek-V2-Lite's mscale = mscale_all_dim = 0.707 gives R = 1 and
    L = 0.707 (what llama.cpp's converter writes). mscale 1.0 with mscale_all_dim 0.707: model.py scales
    cos/sin by a = g(1) / g(0.707) = 1.368888 / 1.260804 = 1.085726 and logits by g(0.707)^2 = 1.589626;
    llama.cpp's cos/sin get R = a, its logits (R g(L))^2, so g(L) = 1.589626 / 1.368888, L = 0.437135."""
    for (mscale, mscale_all), (R, L) in (((0.707, 0.707), (1.0, 0.707)), ((1.0, 0.707), (1.085726, 0.437135))):
        d = tiny_config("deepseek_v2", rope_parameters=yarn(mscale, mscale_all), vocab_size=VOCAB).to_dict()
        got = export.yarn_factors(hf_format.config_from_hf(d), 40.0)
        assert got == pytest.approx((R, L), abs=2e-6), (mscale, mscale_all)


def test_deepseek_with_q_lora_and_v2_lite_layer_count_is_refused():
    """llama.cpp reads no q_lora_rank for 26 or 27 layers (it takes those to be V2-Lite) and then fails
    to load such a model with a q_lora ("tensor 'blk.0.attn_q.weight' not found", seen with 27 layers)."""
    for layers, refused in ((26, True), (27, True), (28, False)):
        cfg = hf_format.config_from_hf(tiny_config("deepseek_v3", num_hidden_layers=layers, vocab_size=VOCAB).to_dict())
        assert (export.unsupported(cfg) is not None) == refused, layers


@pytest.mark.parametrize("vid", ["ds2-mla-greedy", "mixtral-gqa"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_dtypes(vid, dtype, checkpoint, exported, tokenizer):
    """Every weight holds the float32 export's values to the type's rounding; routers, norms and
    biases stay float32 bit for bit; llama.cpp loads and runs the file. Its logits move by the
    weights' rounding (and llama.cpp rounds activations to the weight type in its dot products), and
    at a few positions a rounded router picks another expert, which moves that position's logits by
    up to ~1.5 (a routing flip is all-or-nothing for its token). So the bound is on the median over
    positions of the max |logit diff|: measured up to 3.9e-3 (f16), 3.0e-2 (bf16), 9.0e-2 (q8_0) over
    five architectures; bounds ~3x that, far below a layout error (~3 at every position)."""
    f32 = {t.name: t for t in gguf.GGUFReader(exported(vid, "f32")).tensors}
    reader = gguf.GGUFReader(exported(vid, dtype))
    assert export.gguf_value(reader, "general.file_type") == export.FILE_TYPES[dtype]
    for t in reader.tensors:
        want = np.asarray(f32[t.name].data)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        if t.name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight")) or want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), t.name
        elif dtype == "q8_0" and t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            # one scale d = max|block| / 127 per 32 values, stored as f16: error <= d/2 + 127 d 2^-11 < 0.6 d
            assert np.abs(got - want).max() <= np.abs(want).max() / 127 * 0.6, t.name
        else:
            step = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 2.0 ** -11}[dtype]  # q8_0 falls back to f16
            assert np.all(np.abs(got - want) <= np.abs(want) * step + 1e-7), t.name
    _, seq, ref = reference(checkpoint(vid), tokenizer)
    err = np.median(np.abs(llama_logits(llama(exported(vid, dtype)), seq) - ref).max(axis=1))
    assert err <= {"f16": 0.01, "bf16": 0.1, "q8_0": 0.3}[dtype], err


# ---------------------------------------------------------------------------- patch mode


def routers_changed(base, out, seed=1):
    """A ReMoE-like twin of `base`: the same tensors, every router moved by noise of its own scale."""
    tensors = read_tensors(base)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith(".gate.weight"):
            tensors[name] = t + t.std() * torch.randn(t.shape, generator=gen)
    write_checkpoint(out, tensors, read_config(base))
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def tuned(checkpoint, tmp_path_factory):
    cache = {}

    def get(vid):
        if vid not in cache:
            cache[vid] = routers_changed(checkpoint(vid), tmp_path_factory.mktemp(vid + "-tuned"))
        return cache[vid]

    return get


def router_ranges(path):
    return [(int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors
            if t.name.endswith("ffn_gate_inp.weight")]


def assert_only_routers_differ(base, patched):
    a = np.fromfile(base, dtype=np.uint8)
    b = np.fromfile(patched, dtype=np.uint8)
    assert a.shape == b.shape
    differs = a != b
    for start, end in router_ranges(base):
        differs[start:end] = False
    assert not differs.any(), f"{differs.sum()} bytes outside the routers differ"


@pytest.mark.parametrize("vid", PATCHED)
@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_patch_changes_only_the_routers(vid, dtype, exported, tuned, tmp_path):
    """Outside the routers the patched file is the base file byte for byte; inside, it holds exactly
    the tensors a full export of the tuned model holds (so every tensor equals that export's)."""
    patched = tmp_path / "patched.gguf"
    export.patch_gguf(tuned(vid), exported(vid, dtype), patched)
    assert_only_routers_differ(exported(vid, dtype), patched)
    full = tmp_path / "full.gguf"
    export.export_gguf(tuned(vid), full, dtype)
    want = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(full).tensors}
    got = gguf.GGUFReader(patched).tensors
    assert [t.name for t in got] == list(want)
    for t in got:
        assert np.array_equal(np.asarray(t.data), want[t.name]), t.name
    assert sum(not np.array_equal(np.asarray(t.data), np.asarray(b.data))
               for t, b in zip(got, gguf.GGUFReader(exported(vid, dtype)).tensors)) == len(router_ranges(patched))


@pytest.mark.parametrize("vid", PATCHED)
def test_patched_gguf_runs_the_tuned_model(vid, exported, tuned, tokenizer, tmp_path):
    patched = tmp_path / "patched.gguf"
    export.patch_gguf(tuned(vid), exported(vid), patched)
    prompt, seq, ref = reference(tuned(vid), tokenizer)
    llm = llama(patched, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    err = np.abs(llama_logits(llm, seq) - ref).max()
    assert err <= TOL_KV_F32, err
    check_greedy(seq[len(prompt):], llama_greedy(llm, prompt, NEW_TOKENS), ref, len(prompt), 2 * TOL_KV_F32)
    base = llama(exported(vid), type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    base_err = np.abs(llama_logits(base, seq) - ref).max(axis=1)
    assert np.median(base_err) > 0.1, base_err  # the base file is far from the tuned model: the patch did it


def test_patch_a_base_quantized_by_llama_cpp(exported, tuned, tokenizer, tmp_path):
    """The deployment the paper means: a user's Q4_K_M of the base (made by llama.cpp's own quantizer;
    these tiny rows are not multiples of 256, so it falls back to q5_0/q5_1/q8_0/f16 as it does for such
    shapes), routers replaced. Routers stay f32 under llama.cpp's quantizer, so they are the tuned ones
    bit for bit, and the file runs closer to the tuned model than the quantized base does."""
    vid = "ds2-mla-greedy"
    base = tmp_path / "base-Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(exported(vid)).encode(), str(base).encode(), params) == 0
    patched = tmp_path / "remoe-Q4_K_M.gguf"
    export.patch_gguf(tuned(vid), base, patched)
    assert_only_routers_differ(base, patched)
    state = read_tensors(tuned(vid))
    for t in gguf.GGUFReader(patched).tensors:
        if t.name.endswith("ffn_gate_inp.weight"):
            layer = t.name.split(".")[1]
            assert np.array_equal(np.asarray(t.data), state[f"model.layers.{layer}.mlp.gate.weight"].numpy())
    _, seq, ref = reference(tuned(vid), tokenizer)
    to_tuned = np.abs(llama_logits(llama(patched), seq) - ref).mean()
    base_to_tuned = np.abs(llama_logits(llama(base), seq) - ref).mean()
    assert np.isfinite(to_tuned) and to_tuned < base_to_tuned / 2, (to_tuned, base_to_tuned)


MISMATCHES = {  # the tuned checkpoint (variant, overrides) and what the refusal must name
    "architecture": ("qwen3-gqa-headdim", {}, "general.architecture is 'deepseek2'"),
    "layers": ("ds2-mla-greedy", {"num_hidden_layers": 4}, "block_count is 3"),
    "experts": ("ds2-mla-greedy", {"n_routed_experts": 16}, "expert_count is 8"),
    "top-k": ("ds2-mla-greedy", {"num_experts_per_tok": 2}, "expert_used_count is 3"),
    "hidden": ("ds2-mla-greedy", {"hidden_size": 96}, "embedding_length is 64"),
    "dense layers": ("ds2-mla-greedy", {"first_k_dense_replace": 0}, "router blk.0.ffn_gate_inp.weight is only in"),
    "shapes": ("ds2-mla-greedy", {"kv_lora_rank": 32}, "attn_kv_a_norm.weight has shape [16]"),
    "other weights": ("ds2-mla-greedy", {"seed": 1}, "not of the model these routers were tuned from"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_patch_refuses_a_gguf_of_another_model(case, checkpoint, exported, tmp_path):
    vid, overrides, message = MISMATCHES[case]
    out = tmp_path / "out.gguf"
    with pytest.raises(cli.UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        export.patch_gguf(checkpoint(vid, **overrides), exported("ds2-mla-greedy"), out)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- command line


def test_cli_writes_the_gguf(checkpoint, exported, tuned, tmp_path, capsys):
    out = tmp_path / "sub" / "remoe.gguf"
    export.main([str(tuned("ds2-mla-greedy")), "--patch-gguf", str(exported("ds2-mla-greedy")), "--gguf", str(out)])
    assert "every other byte unchanged" in capsys.readouterr().out
    export.main([str(checkpoint("ds2-mla-greedy")), "--gguf", str(out), "--dtype", "q8_0"])  # replaces it
    assert "q8_0" in capsys.readouterr().out
    assert export.gguf_value(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [f.name for f in out.parent.iterdir()] == ["remoe.gguf"]  # no temporary left behind


def test_bad_input_is_refused_before_writing(checkpoint, exported, tuned, tmp_path):
    good, base = checkpoint("ds2-mla-greedy"), exported("ds2-mla-greedy")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(good, no_tok)
    (no_tok / "tokenizer.json").unlink()
    whitespace = tmp_path / "whitespace-split"
    shutil.copytree(good, whitespace)
    spec = json.loads((good / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (whitespace / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out" / "x.gguf"
    cases = [
        (lambda: export.export_gguf(no_tok, out), "no tokenizer.json"),
        (lambda: export.export_gguf(whitespace, out), "use --patch-gguf"),
        (lambda: export.patch_gguf(good, tmp_path / "none.gguf", out), "no such file"),
        (lambda: export.patch_gguf(tuned("ds2-mla-greedy"), base, base), "is the input file"),
    ]
    for call, message in cases:
        with pytest.raises(cli.UserError, match=message):
            call()
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_is_one_line(checkpoint, exported, tmp_path):
    good, base = checkpoint("ds2-mla-greedy"), exported("ds2-mla-greedy")
    out = str(tmp_path / "out" / "x.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a gguf file\n")
    cut = tmp_path / "cut.gguf"  # a GGUF's magic, then the file ends inside its key/values
    cut.write_bytes(base.read_bytes()[:100])
    cases = {
        "missing folder": ([str(tmp_path / "nope"), "--gguf", out], "model folder does not exist"),
        "no --gguf": ([str(good)], "--gguf OUT.gguf is required"),
        "unknown dtype": ([str(good), "--gguf", out, "--dtype", "q4"], "--dtype must be one of f32, f16, bf16, q8_0"),
        "output is a folder": ([str(good), "--gguf", str(tmp_path)], "is a folder"),
        "patch: not a GGUF": ([str(good), "--patch-gguf", str(not_gguf), "--gguf", out], "not a GGUF file"),
        "patch: truncated GGUF": ([str(good), "--patch-gguf", str(cut), "--gguf", out], "not a readable GGUF"),
        "patch: with --dtype": ([str(good), "--patch-gguf", str(base), "--gguf", out, "--dtype", "f16"],
                                "--dtype applies to a full export"),
    }
    assert_cli_errors(export.__file__, cases, cwd=tmp_path)
    assert not (tmp_path / "out").exists()
