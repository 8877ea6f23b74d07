"""The vidrd-base networks have exactly the authors' state-dict layout (../shared/fixtures), built on meta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vidrd_rt.runtime.config import model_preset
from vidrd_rt.runtime.model import VidRDModel

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FILES = {"unet": "vidrd_unet3d_state_dict.json", "vae": "vidrd_temporal_vae_state_dict.json",
         "text_encoder": "vidrd_text_encoder_state_dict.json"}


@pytest.fixture(scope="module")
def base_layout():
    return VidRDModel.build(model_preset("vidrd-base"), device="meta").authors_layout()


def _fixture(network):
    path = FIXTURES / FILES[network]
    if not path.is_file():
        pytest.skip(f"{path} not present (the fixtures live in ../shared beside the checkout)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("network", list(FILES))
def test_layout_equals_authors_fixture(base_layout, network):
    fixture = _fixture(network)
    expected = [e for e in fixture["entries"] if not e[0].endswith("position_ids")]  # a buffer, may be absent
    assert base_layout[network] == expected  # names, shapes, dtypes, and order
    total = sum(_numel(shape) for name, shape, _ in base_layout[network])
    assert total == fixture["counts"]["total_params"]
    temporal = sum(_numel(shape) for name, shape, _ in base_layout[network] if "temp" in name)
    assert temporal == fixture["counts"]["temp_params"]


def test_parameter_counts_of_presets():
    counts = VidRDModel.build(model_preset("vidrd-base"), device="meta").parameter_counts()
    assert counts["unet"] == {"total": 1_182_401_284, "temporal": 316_490_560}
    assert counts["vae"] == {"total": 100_059_495, "temporal": 16_405_632}
    assert counts["text_encoder"]["total"] == 340_387_840
    tiny = VidRDModel.build(model_preset("tiny"), device="meta").parameter_counts()
    assert tiny["unet"]["temporal"] > 0 and tiny["unet"]["total"] < 10_000_000


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
