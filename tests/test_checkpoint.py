"""Checkpoint folders: round trips with transformers, the key layouts found on the hub, clear errors, hub resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smolvlm.config import text_config_to_hf_dict
from smolvlm.errors import CheckpointError, ModelNotFoundError
from smolvlm.model import CausalLM, SmolVLM
from smolvlm.weights.checkpoint import PACK_ALIGN, load_model, pack_onto, save_tensors, weight_files
from smolvlm.weights.hub import resolve_model_path
from tests.helpers_model import hf_smolvlm, image_prompt, ours_from_hf, randomize_, random_tiles, tiny_config

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    """A tiny 256M-family reference model and matching inputs."""
    config = tiny_config("256M")
    hf = hf_smolvlm(config, seed=5)
    ids = image_prompt(config, tiles=2, text_before=3, text_after=4, seed=6)[None]
    pixels, pixel_mask = random_tiles(config, [2], seed=7)
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
    return config, hf, (ids, pixels, pixel_mask), logits


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory) -> Path:
    """The reference model as transformers' save_pretrained writes it."""
    directory = tmp_path_factory.mktemp("hf_saved")
    reference[1].save_pretrained(directory)
    return directory


def our_logits(model: SmolVLM, inputs) -> torch.Tensor:
    ids, pixels, pixel_mask = inputs
    with torch.no_grad():
        return model(ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits


def copy_folder(src: Path, dst: Path, rename=None, drop=(), tensors=None) -> Path:
    """Copy a checkpoint folder, optionally renaming / dropping / replacing tensors of its single weight file."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = tensors if tensors is not None else load_file(src / "model.safetensors")
    state = {(rename(k) if rename else k): v for k, v in state.items() if k not in drop}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---- round trips ----


def test_ours_saved_loads_in_transformers(reference, tmp_path):
    config, hf, inputs, expected = reference
    ours = ours_from_hf(hf, config)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, info = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, pixels, pixel_mask = inputs
    with torch.no_grad():
        logits = loaded.eval()(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
    assert (logits - expected).abs().max().item() <= TOL


def test_transformers_saved_loads_in_ours(reference, hf_folder):
    _, _, inputs, expected = reference
    model = SmolVLM.from_pretrained(hf_folder)
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    assert (our_logits(model, inputs) - expected).abs().max().item() <= TOL
    assert isinstance(load_model(hf_folder), SmolVLM)


def test_packed_weights_are_one_allocation_and_fuse_in_place(reference, hf_folder):
    """What a GPU load does (`pack_onto`): every weight a view of one buffer, each start aligned; the model gives the
    same logits, and fusing q/k/v and gate/up then makes views of that buffer instead of copies."""
    config, _, inputs, expected = reference
    state = SmolVLM.from_pretrained(hf_folder).state_dict()
    packed = pack_onto({name: t.clone() for name, t in state.items()}, list(state), torch.device("cpu"))
    assert list(packed) == list(state) and all(torch.equal(packed[k], state[k]) for k in state)
    assert len({t.untyped_storage().data_ptr() for t in packed.values()}) == 1
    start = min(t.data_ptr() for t in packed.values())
    assert all((t.data_ptr() - start) % PACK_ALIGN == 0 for t in packed.values())
    model = SmolVLM(config)
    model.load_state_dict(packed, assign=True)
    model.eval().text_model.fuse_projections()
    buffer = packed["lm_head.weight"].untyped_storage().data_ptr()
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == {buffer}
    assert (our_logits(model, inputs) - expected).abs().max().item() <= TOL


def test_tied_head_round_trip(tmp_path):
    """Tied lm_head: absent from the file we write, transformers re-ties it, and we load its folder back tied."""
    config = tiny_config("2.2B", tie_word_embeddings=True)
    hf = hf_smolvlm(config, seed=8)
    ours = ours_from_hf(hf, config)
    ours.save_pretrained(tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    again = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    assert again.lm_head.weight.data_ptr() == again.model.text_model.embed_tokens.weight.data_ptr()
    hf.save_pretrained(tmp_path / "hf")
    back = SmolVLM.from_pretrained(tmp_path / "hf")
    assert back.lm_head.weight is back.text_model.embed_tokens.weight
    ids = image_prompt(config, 1, 2, 2, seed=9)[None]
    pixels, pixel_mask = random_tiles(config, [1], seed=10)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
    assert (our_logits(back, (ids, pixels, pixel_mask)) - expected).abs().max().item() <= TOL


def test_dtype_and_saving_over_a_sharded_folder(reference, hf_folder, tmp_path):
    model = SmolVLM.from_pretrained(hf_folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.text_model.rotary.inv_freq.dtype == torch.float32 and not model.text_model.rotary.inv_freq.is_meta
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "old-00001.safetensors"}}))
    (tmp_path / "old-00001.safetensors").write_bytes(b"stale")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---- layouts found on the hub ----


def test_layout_without_model_prefix(reference, hf_folder, tmp_path):
    """SmolVLMModel / Idefics3Model checkpoints: no `model.` prefix and no LM head (so the config ties it)."""
    config, _, inputs, _ = reference
    folder = copy_folder(hf_folder, tmp_path, rename=lambda k: k.removeprefix("model."), drop={"lm_head.weight"})
    data = json.loads((folder / "config.json").read_text())
    data["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(data))
    model = SmolVLM.from_pretrained(folder)
    assert model.lm_head.weight is model.text_model.embed_tokens.weight
    expected = SmolVLM.from_pretrained(hf_folder)
    expected.lm_head.weight = expected.text_model.embed_tokens.weight
    assert torch.equal(our_logits(model, inputs), our_logits(expected, inputs))


def test_sharded_checkpoint(reference, hf_folder, tmp_path):
    _, _, inputs, expected = reference
    state = load_file(hf_folder / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(weight_files(tmp_path)) == 2
    assert (our_logits(SmolVLM.from_pretrained(tmp_path), inputs) - expected).abs().max().item() <= TOL


def test_idefics3_checkpoint(tmp_path):
    """SmolVLM v1 checkpoints are Idefics3ForConditionalGeneration folders (model_type idefics3)."""
    config = tiny_config("2.2B")
    data = config.to_hf_dict()
    data["vision_config"]["model_type"] = "idefics3_vision"
    hf = transformers.Idefics3ForConditionalGeneration(transformers.Idefics3Config(**data)).eval()
    randomize_(hf, seed=11)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "idefics3"
    ids = image_prompt(config, 2, 2, 2, seed=12)[None]
    pixels, pixel_mask = random_tiles(config, [2], seed=13)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, pixel_attention_mask=pixel_mask).logits
    got = our_logits(SmolVLM.from_pretrained(tmp_path), (ids, pixels, pixel_mask))
    assert (got - expected).abs().max().item() <= TOL


def test_text_only_llama_round_trip(tmp_path):
    config = tiny_config("256M").text
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_to_hf_dict(config))).eval()
    randomize_(hf, seed=14)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        ours = CausalLM.from_pretrained(tmp_path / "hf")
        assert (ours(ids) - expected).abs().max().item() <= TOL
        assert isinstance(load_model(tmp_path / "hf"), CausalLM)
        ours.save_pretrained(tmp_path / "ours")
        again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert (again(input_ids=ids).logits - expected).abs().max().item() <= TOL
        # LlamaModel-style keys (no `model.` prefix) beside lm_head.weight.
        folder = copy_folder(tmp_path / "hf", tmp_path / "bare", rename=lambda k: k.removeprefix("model."))
        assert (CausalLM.from_pretrained(folder)(ids) - expected).abs().max().item() <= TOL
    # Fields absent from a llama config.json take LlamaConfig's defaults (rms_norm_eps 1e-6), not SmolVLM's.
    data = json.loads((folder / "config.json").read_text())
    del data["rms_norm_eps"]
    (folder / "config.json").write_text(json.dumps(data))
    assert CausalLM.from_pretrained(folder).config.rms_norm_eps == 1e-6


# ---- errors: each names the file and the tensor ----


def test_missing_config_and_unknown_model_type(hf_folder, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        SmolVLM.from_pretrained(tmp_path)
    folder = copy_folder(hf_folder, tmp_path / "bert")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown model_type 'bert'"):
        SmolVLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="text-only"):
        llama = tmp_path / "llama"
        llama.mkdir()
        (llama / "config.json").write_text(json.dumps(text_config_to_hf_dict(tiny_config("256M").text)))
        SmolVLM.from_pretrained(llama)


def test_missing_weight_file(hf_folder, tmp_path):
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        SmolVLM.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        SmolVLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        SmolVLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weight_file(hf_folder, tmp_path, damage):
    folder = copy_folder(hf_folder, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage]
    (folder / "model.safetensors").write_bytes(broken)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file.*re-download"):
        SmolVLM.from_pretrained(folder)


def test_wrong_shape(hf_folder, tmp_path):
    state = load_file(hf_folder / "model.safetensors")
    key = "model.text_model.layers.1.mlp.up_proj.weight"
    state[key] = state[key][:-1]
    folder = copy_folder(hf_folder, tmp_path, tensors=state)
    expected = rf"model\.safetensors: tensor '{key}' has shape \[191, 96\].*\[192, 96\]"
    with pytest.raises(CheckpointError, match=expected):
        SmolVLM.from_pretrained(folder)


def test_failed_write_is_an_os_error_naming_the_file(tmp_path):
    path = tmp_path / "missing-folder" / "model.safetensors"
    with pytest.raises(OSError, match="could not write .*missing-folder/model.safetensors: .*No such file"):
        save_tensors({"w": torch.zeros(2)}, path)
    assert save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors") == tmp_path / "w.safetensors"
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2))


def test_missing_tensor(hf_folder, tmp_path):
    key = "model.vision_model.encoder.layers.0.self_attn.k_proj.bias"
    folder = copy_folder(hf_folder, tmp_path, drop={key})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor\(s\) '{key}'"):
        SmolVLM.from_pretrained(folder)
    untied = copy_folder(hf_folder, tmp_path / "no_head", drop={"lm_head.weight"})  # config does not tie
    with pytest.raises(CheckpointError, match="missing tensor.*'lm_head.weight'"):
        SmolVLM.from_pretrained(untied)


def test_unexpected_tensor(hf_folder, tmp_path):
    state = load_file(hf_folder / "model.safetensors")
    state["model.text_model.layers.2.mlp.up_proj.weight"] = torch.zeros(192, 96)  # a layer the config lacks
    folder = copy_folder(hf_folder, tmp_path, tensors=state)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.text_model\.layers\.2"):
        SmolVLM.from_pretrained(folder)


# ---- hub resolution (never touches the network) ----


def test_resolve_local_folder_and_missing_paths(hf_folder, tmp_path):
    assert resolve_model_path(hf_folder) == hf_folder
    assert resolve_model_path(str(hf_folder)) == hf_folder
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(hf_folder / "config.json")


def test_resolve_from_offline_hf_cache(hf_folder, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-smolvlm"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    copy_folder(hf_folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("someone/tiny-smolvlm") == snapshot
    assert isinstance(SmolVLM.from_pretrained("someone/tiny-smolvlm"), SmolVLM)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("someone/not-cached")
    message = str(info.value)
    assert "Hugging Face cache" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
