"""Each full preset, built on the meta device, has the published parameter count."""

import pytest
import torch

from smolvlm.config import preset
from smolvlm.model import SmolVLM

# Published sizes: 256M, 507M (model card of SmolVLM-500M), 2.25B (SmolVLM-Instruct).
PUBLISHED = {"SmolVLM-256M-Instruct": 256.5e6, "SmolVLM-500M-Instruct": 507.5e6, "SmolVLM-Instruct": 2246.3e6}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_count(name):
    config = preset(name)
    with torch.device("meta"):
        model = SmolVLM(config)
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count:,} parameters")
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.002
    assert all(p.is_meta for p in model.parameters())
    projection = model.connector.modality_projection["proj"].weight
    assert projection.shape == (config.text.hidden_size, config.vision.hidden_size * config.scale_factor**2)
    assert config.tokens_per_tile == {"SmolVLM-Instruct": 81}.get(name, 64)
