"""Loading: the authors' release layout, our converted folder, random weights, and every refusal."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest
import torch
from conftest import authors_state, fresh_tiny, write_authors_release

from vidrd_rt.runtime.weights import ModelSource, WeightsError, load_model, save_converted


def _outputs(model, unet_inputs):
    with torch.no_grad():
        eps = model.unet(*unet_inputs)
        video = model.vae.decode(torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(2)))
        text = model.text_encoder(torch.arange(77)[None] % 500)
    return eps, video, text


def test_random_weights_leave_nothing_zero(tiny_model):
    for name, net in tiny_model.networks().items():
        for key, p in net.named_parameters():
            assert (p != 0).float().mean() > 0.99, f"{name}.{key} has zeros"


def test_authors_release_loads_and_matches_in_memory_model(tmp_path, tiny_model, unet_inputs):
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    loaded = load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))
    # Architecture read from the folders' configs; sample_size is the authors' training resolution (256 / 8).
    assert loaded.config.unet == dataclasses.replace(tiny_model.config.unet, sample_size=32)
    assert loaded.config.vae == tiny_model.config.vae
    for ours, ref in zip(_outputs(loaded, unet_inputs), _outputs(tiny_model, unet_inputs)):
        assert torch.equal(ours, ref)


def test_checkpoint_overrides_sd_folder_unet(tmp_path, tiny_model, unet_inputs):
    sd_weights = {k: torch.full_like(v, 0.5) for k, v in authors_state(tiny_model, "unet").items() if "temp" not in k}
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model, sd_unet_weights=sd_weights)
    loaded = load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))
    assert torch.equal(loaded.unet.conv_in.weight, tiny_model.unet.conv_in.weight)


def test_sd_folder_supplies_what_the_checkpoint_lacks(tmp_path, tiny_model):
    unet = authors_state(tiny_model, "unet")
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model, sd_unet_weights={"conv_in.weight": unet["conv_in.weight"]})
    released = torch.load(ckpt, weights_only=True)
    del released["state_dict"]["unet.conv_in.weight"]
    torch.save(released, ckpt)
    loaded = load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))
    assert torch.equal(loaded.unet.conv_in.weight, unet["conv_in.weight"])


def test_convert_then_load_is_bit_exact(tmp_path, tiny_model, unet_inputs):
    save_converted(tiny_model, tmp_path / "model")
    loaded = load_model(ModelSource(model=str(tmp_path / "model")))
    for network, module in tiny_model.networks().items():
        mine = loaded.networks()[network].state_dict()
        for k, v in module.state_dict().items():
            assert torch.equal(mine[k], v), f"{network}.{k}"
    for ours, ref in zip(_outputs(loaded, unet_inputs), _outputs(tiny_model, unet_inputs)):
        assert torch.equal(ours, ref)
    assert not (tmp_path / ".model.partial").exists()


def test_convert_refuses_existing_folder(tmp_path, tiny_model):
    (tmp_path / "model").mkdir()
    with pytest.raises(WeightsError, match="already exists"):
        save_converted(tiny_model, tmp_path / "model")


def test_load_casts_once_to_dtype(tmp_path, tiny_model):
    save_converted(tiny_model, tmp_path / "model")
    loaded = load_model(ModelSource(model=str(tmp_path / "model")), dtype=torch.bfloat16)
    dtypes = {p.dtype for net in loaded.networks().values() for p in net.parameters()}
    assert dtypes == {torch.bfloat16}


#################################################################################
#                                     Refusals                                   #
#################################################################################


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, tiny_model):
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"unet.x": evil}}, f)
    with pytest.raises(WeightsError, match="refused"):
        load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))
    assert not evil.marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "junk"])
def test_partial_or_junk_checkpoint(tmp_path, tiny_model, damage):
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint at all" * 100)
    with pytest.raises(WeightsError, match="ModelT2V.pth"):
        load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))


def _edit_vae(vae_dir, edit):
    state = torch.load(vae_dir / "diffusion_pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, vae_dir / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("decoder.conv_out.weight"), "missing, e.g. decoder.conv_out.weight"),
    (lambda s: s.__setitem__("decoder.extra.weight", torch.ones(1)), "unexpected vae weights, e.g. decoder.extra"),
    (lambda s: s.__setitem__("decoder.conv_out.bias", torch.ones(7)), "wrong shape, e.g. decoder.conv_out.bias"),
])
def test_key_and_shape_errors_name_the_keys(tmp_path, tiny_model, edit, message):
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    _edit_vae(vae, edit)
    with pytest.raises(WeightsError, match=message.replace("(", r"\(")):
        load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))


def test_vae_old_attention_names_are_required_to_map(tmp_path, tiny_model):
    """The VAE file carries diffusers-0.14 names (query/key/value/proj_attn); they load as to_q/... ."""
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    keys = torch.load(vae / "diffusion_pytorch_model.bin", weights_only=True).keys()
    assert any(".attentions.0.query." in k for k in keys) and not any(".to_q." in k for k in keys)


def test_missing_and_malformed_config(tmp_path, tiny_model):
    ckpt, sd, vae = write_authors_release(tmp_path, tiny_model)
    (vae / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))
    (sd / "unet" / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json: file not found"):
        load_model(ModelSource(ckpt=str(ckpt), sd_dir=str(sd), vae_dir=str(vae)))


def test_converted_folder_errors(tmp_path, tiny_model):
    save_converted(tiny_model, tmp_path / "model")
    (tmp_path / "model" / "unet.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="unet.safetensors: not a readable safetensors"):
        load_model(ModelSource(model=str(tmp_path / "model")))
    (tmp_path / "model" / "vidrd.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(WeightsError, match="not a vidrd-rt model config"):
        load_model(ModelSource(model=str(tmp_path / "model")))
    with pytest.raises(WeightsError, match="not a folder"):
        load_model(ModelSource(model=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("source, message", [
    (ModelSource(random_weights=True), "needs an architecture"),
    (ModelSource(model="tiny"), "add --random-weights"),
    (ModelSource(ckpt="x.pth"), "needs --ckpt ModelT2V.pth and --sd"),
])
def test_source_errors(source, message):
    with pytest.raises(WeightsError, match=message):
        load_model(source)


def test_random_weights_are_seeded():
    a, b, c = fresh_tiny(0), fresh_tiny(0), fresh_tiny(1)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
