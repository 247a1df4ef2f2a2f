"""Bad inputs read by every script (checkpoints, config.json, the shard index, tokenizers): each is
refused with one line that names the file and the tensor, key or entry, never a traceback and never a
model that loads and prints garbage. Tiny checkpoints from conftest's `tiny`, copied and then damaged."""

import json
import shutil
import warnings

import pytest
import torch

import checkpoint
import cli
import store
from tiny import mtp_layer_tensors, read_config, read_tensors, write_checkpoint, yarn

BASE = "qwen3-gqa-headdim"  # disk names equal module names
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"
ROUTER = "model.layers.1.mlp.gate.weight"
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def good(tiny):
    return tiny(BASE)[1]


@pytest.fixture
def damaged(good, tmp_path):
    """`damaged(edit=None, config=None)`: a copy of the good checkpoint whose tensors `edit` changes (a
    dict in place) and whose config.json has the keys of `config`."""
    def make(edit=None, config=None, base=good):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        tensors, cfg = read_tensors(base), read_config(base)
        if edit:
            edit(tensors)
        write_checkpoint(d, tensors, {**cfg, **(config or {})})
        return d
    return make


def refused(fn, *fragments):
    """fn() raises one UserError of one line that mentions every fragment; returns the message."""
    with pytest.raises(cli.UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for f in fragments:
        assert str(f) in message, (f, message)
    return message


def run_main(main, argv, capsys):
    """A script's main(argv) ends with status 2 and exactly one `error:` line on stderr; returns it."""
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def set_(name, value, index=(0, 0)):
    def edit(tensors):
        tensors[name][index] = value
    return edit


# ---------------------------------------------------------------- non-finite and integer weights

@pytest.mark.parametrize("name,value", [(EXPERT, float("nan")), (ROUTER, float("inf")), (EMBED, float("nan"))])
def test_non_finite_weight_refused_by_name(name, value, damaged, capsys):
    d = damaged(set_(name, value))
    refused(lambda: checkpoint.load_model(d), name, "NaN or infinite")
    line = run_main(checkpoint.main, ["--model", d], capsys)
    assert name in line


def test_non_finite_expert_on_disk_refused_when_read(damaged):
    """Offloaded experts are checked as they are read into a slot, not by a scan at load."""
    d = damaged(set_(EXPERT, float("nan")))
    checkpoint.load_model(d, experts_on_disk=True)  # loads: the expert is on disk
    with store.ExpertStore(d) as s:
        s.read(1, 2)  # a good expert reads
        refused(lambda: s.read(1, 3), EXPERT, "NaN or infinite")


@pytest.mark.parametrize("name", [ROUTER, EXPERT])
def test_integer_weight_refused(name, damaged):
    def edit(tensors):
        tensors[name] = tensors[name].to(torch.int32)
    d = damaged(edit)
    refused(lambda: checkpoint.load_model(d), name, "I32")
    if name == EXPERT:
        refused(lambda: store.ExpertStore(d), name, "I32")


# ---------------------------------------------------------------- config.json against the checkpoint

@pytest.mark.parametrize("layers", [1, 2, 0, -1, True])
def test_config_with_fewer_layers_than_the_checkpoint_refused(layers, damaged):
    d = damaged(config={"num_hidden_layers": layers})
    refused(lambda: checkpoint.load_model(d), "num_hidden_layers")


def test_mtp_layer_skipped_only_when_declared(tiny, damaged):
    _, ds3 = tiny("ds3-noaux-norm")
    cfg = read_config(ds3)

    def add_mtp(tensors):
        tensors.update(mtp_layer_tensors(tensors, cfg))
    undeclared = damaged(add_mtp, {"num_nextn_predict_layers": 0}, base=ds3)
    refused(lambda: checkpoint.load_model(undeclared), "model.layers.3.", "num_hidden_layers 3")
    declared = damaged(add_mtp, {"num_nextn_predict_layers": 1}, base=ds3)
    checkpoint.load_model(declared)  # layer 3 is the MTP layer

    def beyond(tensors):
        add_mtp(tensors)
        tensors["model.layers.4.enorm.weight"] = torch.ones(cfg["hidden_size"])
    refused(lambda: checkpoint.load_model(damaged(beyond, {"num_nextn_predict_layers": 1}, base=ds3)),
            "model.layers.4.enorm.weight", "num_nextn_predict_layers 1")


# key, value, what the message says is expected (bool is refused where a number is expected)
BAD_VALUES = [
    ("vocab_size", -5, "integer >= 1"), ("vocab_size", True, "integer >= 1"), ("hidden_size", 64.0, "integer"),
    ("rms_norm_eps", "tiny", "number > 0"), ("rms_norm_eps", 0, "number > 0"),
    ("num_experts_per_tok", 2.0, "integer"), ("num_key_value_heads", 3, "divisor"),
    ("tie_word_embeddings", 1, "true or false"), ("mlp_only_layers", ["1"], "list of layer numbers"),
    ("rope_parameters", ["default"], "object"), ("quantization_config", "fp8", "object"),
    ("rope_parameters", yarn(1.0, 1.0, factor=0), "number > 0"),
    ("rope_parameters", yarn(1.0, 1.0, factor=-2.0), "number > 0"),
    ("rope_parameters", {**yarn(1.0, 1.0), "factor": None}, "factor"),
]


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_bad_config_value_refused_naming_key_and_value(key, value, expected, good):
    d = {**read_config(good), key: value}
    message = refused(lambda: checkpoint.config_from_hf(d), key, expected)
    assert "factor" in message or repr(value) in message


@pytest.mark.parametrize("key,value", [("topk_group", 5), ("n_group", 0), ("kv_lora_rank", "16")])
def test_bad_deepseek_value_refused(key, value, tiny):
    d = {**read_config(tiny("ds3-noaux-norm")[1]), key: value}
    refused(lambda: checkpoint.config_from_hf(d), key, repr(value))


def test_bad_value_names_the_file(good, damaged):
    d = damaged(config={"rms_norm_eps": "tiny"})
    refused(lambda: checkpoint.read_config(d), d / "config.json", "rms_norm_eps", "'tiny'")


@pytest.mark.parametrize("content", [b'{"model_type": "qwen3_moe", "x": "\xff"}', b"[" * 100000 + b"]" * 100000],
                         ids=["not-utf8", "deeply-nested"])
def test_unreadable_config_json_names_the_file(content, good, tmp_path, capsys):
    d = tmp_path / "model"
    shutil.copytree(good, d)
    (d / "config.json").write_bytes(content)
    refused(lambda: checkpoint.read_config(d), d / "config.json")
    assert str(d / "config.json") in run_main(checkpoint.main, ["--model", d], capsys)


# ---------------------------------------------------------------- shard names

@pytest.mark.parametrize("where", ["sub/{}", "../{}", "/abs/{}"])
def test_shard_outside_the_folder_refused(where, tiny, tmp_path):
    hf, _ = tiny(BASE)
    d = tmp_path / "model"
    hf.save_pretrained(str(d), max_shard_size="64KB")
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    target = where.format(shard).replace("/abs", str(tmp_path / "abs"))
    (d / target).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(d / shard, d / target)  # the shard is there: only its name is wrong
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    refused(lambda: checkpoint.load_model(d), index_file, repr(target), "plain file name")


# ---------------------------------------------------------------- tokenizers

def word_tokenizer(n):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, n)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture
def with_tokenizer(good, tmp_path):
    """`with_tokenizer(n_tokens)`: a copy of the good checkpoint (vocab_size 160) with a tokenizer."""
    def make(n):
        d = tmp_path / f"tok{n}"
        shutil.copytree(good, d)
        word_tokenizer(n).save(str(d / "tokenizer.json"))
        return d
    return make


def test_tokenizer_larger_than_the_vocabulary_refused(with_tokenizer, capsys):
    assert checkpoint.load_tokenizer(with_tokenizer(160)) is not None  # fits exactly
    d = with_tokenizer(200)
    refused(lambda: checkpoint.read_config(d), "200", "160")  # read_config: train.py's first read
    assert "vocab_size 160" in run_main(checkpoint.main, ["--model", d, "--prompt", "w199"], capsys)


@pytest.mark.parametrize("name,content", [("tokenizer.json", "{not json"), ("tokenizer_config.json", "{not json"),
                                          ("tokenizer_config.json", "[]"),
                                          ("tokenizer_config.json", '{"eos_token": {"id": 2}}')])
def test_corrupt_tokenizer_files_name_the_file(name, content, with_tokenizer):
    d = with_tokenizer(100)
    (d / name).write_text(content)
    refused(lambda: checkpoint.read_config(d), d / name)


@pytest.mark.parametrize("name,content", [("tokenizer.json", '{"model": {"type": "BPE"}}'),
                                          ("tokenizer_config.json", '{"eos_token": 2}'), ("tokenizer.json", None)])
def test_train_refuses_bad_tokenizer_before_any_work(name, content, with_tokenizer, corpus, tmp_path, capsys):
    """train.py reads the model's config first (checkpoint.read_config), which checks its tokenizer."""
    import train
    from tiny import finetune_args

    out = tmp_path / "run"
    shutil.copytree(with_tokenizer(100 if content else 161), out / "base")
    if content:
        (out / "base" / name).write_text(content)
    line = run_main(train.main, finetune_args(corpus, out), capsys)
    assert str(out / "base" / name) in line and (content or "vocab_size 160" in line)
    assert sorted(p.name for p in out.iterdir()) == ["base"]  # nothing written


@pytest.mark.parametrize("damage", ["no-vocab", "negative-id", "negative-added-id"])
def test_export_refuses_malformed_tokenizer(damage, with_tokenizer):
    export = pytest.importorskip("export")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = with_tokenizer(100)
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    spec = json.loads(tok.to_str())
    if damage == "no-vocab":
        del spec["model"]["vocab"]
    elif damage == "negative-id":
        spec["model"]["vocab"]["b"] = -1
    else:
        spec["added_tokens"] = [{"id": -3, "content": "<x>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True}]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    refused(lambda: export.read_tokenizer(d, 160, {}), d / "tokenizer.json")


# ---------------------------------------------------------------- the error line itself

def test_long_message_cut_with_an_ellipsis(capsys):
    """An overlong name keeps its start and end; the rest of the message (paths included) is kept whole."""
    name = "x" * 200_000
    with pytest.raises(SystemExit), cli.user_errors():
        raise cli.UserError(f"model.safetensors: tensor {name!r} is odd; expected the end")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "..." in err and len(err) <= 320, err[:400]
    assert err.startswith("error: model.safetensors: tensor") and err.strip().endswith("expected the end")
    long_path = "/tmp/" + "/".join(["folder"] * 17) + "/run/remoe.train-state.pt"  # 148 characters: kept whole
    with pytest.raises(SystemExit), cli.user_errors():
        raise cli.UserError(f"{long_path} was saved by another run; {long_path} now")
    assert capsys.readouterr().err.count(long_path) == 2
    with pytest.raises(SystemExit), cli.user_errors():
        raise cli.UserError(" ".join(["word"] * 1000))
    err = capsys.readouterr().err
    assert "..." in err and len(err) <= 620


def test_long_tensor_name_in_one_short_line(damaged, capsys):
    name = "model.layers.0." + "x" * 200_000 + ".weight"
    d = damaged(lambda tensors: tensors.update({name: torch.zeros(2)}))
    line = run_main(checkpoint.main, ["--model", d], capsys)
    assert len(line) - len(str(d)) <= 260 and "..." in line  # the name cut to 160 characters; the folder kept whole


def test_no_warning_from_a_read_only_buffer(good):
    """A tensor viewed in a read-only map gives no torch warning (it would print before an error line).
    torch warns once per process, so this test can only fail where nothing warned before it."""
    import mmap

    info = checkpoint.read_safetensors_header(good / "model.safetensors")[ROUTER]
    files = checkpoint.MappedFiles()
    with open(info.file, "rb") as f:
        files.maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.isfinite(files.tensor(info)).all()
    assert not [w for w in seen if "not writable" in str(w.message)], [str(w.message) for w in seen]
