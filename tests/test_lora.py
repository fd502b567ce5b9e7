"""LoRA: our adapter loads with peft onto transformers' SmolVLM and gives our logits; merge keeps the function."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import write_tiny_checkpoint
from smolvlm.errors import ConfigError
from smolvlm.processing import Processor
from smolvlm.train.commands import merge_lora_main
from smolvlm.train.lora import LoRAConfig, apply_lora, load_adapter, lora_modules, merge_lora, save_adapter
from smolvlm.weights.checkpoint import load_smolvlm

IMAGE = {"type": "image", "image": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), std=0.1)


def _inputs(directory):
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red box"}]}]
    return Processor.from_pretrained(directory).encode_chat([messages])


def _lora_model(directory, targets):
    model = load_smolvlm(directory)
    config = LoRAConfig(r=4, alpha=8.0, targets=targets)
    names = apply_lora(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, 0.2)  # a trained-looking, non-zero update
    return model.eval(), config, names


def test_adapter_loads_with_peft_and_matches_our_logits(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, config, names = _lora_model(tiny, [r"text_model.*(q_proj|v_proj|down_proj)$", r"vision_model.*fc1$",
                                              r"modality_projection\.proj$"])
    assert any(n.startswith("vision_model") for n in names) and "connector.modality_projection.proj" in names
    with torch.no_grad():  # and a part trained in full beside the adapters (PEFT's modules_to_save)
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))
    save_adapter(model, config, tmp_path / "adapter", base_model=str(tiny), full_modules=["lm_head"])
    batch = _inputs(tiny)
    with torch.no_grad():
        ours = model(**vars(batch)).logits
    hf = transformers.SmolVLMForConditionalGeneration.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(**vars(batch)).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # sanity: the adapter really changes the output
    with torch.no_grad():
        base = load_smolvlm(tiny)(**vars(batch)).logits
    assert (base - ours).abs().max() > 1e-2


def test_merge_roundtrip_and_cli(tiny, tmp_path):
    model, config, _ = _lora_model(tiny, [r"text_model.*(q_proj|o_proj|gate_proj)$"])
    with torch.no_grad():
        model.connector.modality_projection.proj.weight.mul_(1.5)
    save_adapter(model, config, tmp_path / "adapter", full_modules=["connector"])
    batch = _inputs(tiny)
    with torch.no_grad():
        ours = model(**vars(batch)).logits
    reloaded = load_smolvlm(tiny)
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**vars(batch)).logits, ours)
        merged = merge_lora(reloaded)
        assert not lora_modules(merged)
        assert torch.allclose(merged(**vars(batch)).logits, ours, atol=1e-5)
    assert merge_lora_main(["--base", str(tiny), "--adapter", str(tmp_path / "adapter"), "--out",
                            str(tmp_path / "merged")]) == 0
    from smolvlm.api import load

    vlm = load(tmp_path / "merged", device="cpu")
    with torch.no_grad():
        assert torch.allclose(vlm.model(**vars(batch)).logits, ours, atol=1e-5)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_bad_targets_and_adapter_errors(tiny, tmp_path, capsys):
    with pytest.raises(ConfigError, match="matches the LoRA targets"):
        apply_lora(load_smolvlm(tiny), LoRAConfig(targets=["no_such_layer"]))
    assert merge_lora_main(["--base", str(tiny), "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
