"""Loading and saving VidRD weights: the authors' release, our converted folder, or random weights.

Every path ends in the same place: per network, a state dict under the authors' key names, checked key by key
and shape by shape against a model built on the meta device, then assigned (no copy beyond the dtype cast).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .config import MODEL_PRESETS, ModelConfig, SchedulerConfig, TextEncoderConfig, UNetConfig, VAEConfig, model_preset
from .model import NETWORKS, VidRDModel
from .text_encoder import BUNDLED_TOKENIZER, load_tokenizer

FORMAT = "vidrd-rt/1"
CONFIG_FILE = "vidrd.json"
# The small model trained here on synthetic scenes (training/), used when no model is given.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"


class WeightsError(UserError, ValueError):
    """Model files are missing, malformed, unsafe or do not fit the architecture (one-line message)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a preset name or our folder (`model`), or the authors' three paths."""

    model: str | None = None  # "tiny", "vidrd-base" or a folder made by `vidrd-rt convert`
    ckpt: str | None = None
    sd_dir: str | None = None
    vae_dir: str | None = None
    random_weights: bool = False
    weights_seed: int = 0

    def kind(self) -> str:
        if self.ckpt or self.sd_dir or self.vae_dir:
            if not (self.ckpt and self.sd_dir):
                raise WeightsError("the authors' layout needs --ckpt ModelT2V.pth and --sd <stable-diffusion folder> "
                                   "(and usually --vae <vae_finetuned folder>)")
            if self.model:
                raise WeightsError("give either --model or --ckpt/--sd/--vae, not both")
            return "authors"
        if self.model in MODEL_PRESETS:
            return "preset"
        if self.model:
            return "converted"
        if self.random_weights:
            raise WeightsError(f"--random-weights needs an architecture: add --model {'|'.join(MODEL_PRESETS)}")
        return "default"


#################################################################################
#                               Reading tensor files                             #
#################################################################################


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from safetensors or a PyTorch file; pickles that would run code are refused."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "GLOBAL" in str(e) or "Unsupported" in str(e):
            raise WeightsError(f"{path}: refused, the file holds pickled objects that would run code; only plain "
                               f"tensor checkpoints are loaded (re-save it as a state dict or safetensors)") from None
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path}: not a complete PyTorch checkpoint ({_first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}}), found something else")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _find_weights(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            if (folder / (stem + suffix)).is_file():
                return folder / (stem + suffix)
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({_first_line(e)})") from None


#################################################################################
#                          Assigning state dicts to modules                      #
#################################################################################


def assign_network(model: VidRDModel, network: str, authors_state: dict[str, torch.Tensor],
                   dtype: torch.dtype, device: str | torch.device, source: str) -> None:
    """Check names and shapes against the (meta) network, cast once, and assign the tensors in place."""
    module = model.networks()[network]
    expected = module.state_dict()
    state = {}
    for key, tensor in authors_state.items():
        if network == "text_encoder" and key.endswith("position_ids"):
            continue  # a buffer transformers 4.x saved; today it is rebuilt, not loaded
        state[model.to_ours(network, key)] = tensor
    _check_keys(network, source, expected, state, model)
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    _materialize_buffers(module, device)


def _check_keys(network, source, expected, state, model) -> None:
    names = lambda keys: ", ".join(model.to_authors(network, k) for k in sorted(keys)[:3])  # noqa: E731
    missing = expected.keys() - state.keys()
    if missing:
        raise WeightsError(f"{source}: {len(missing)} {network} weights missing, e.g. {names(missing)}")
    unexpected = state.keys() - expected.keys()
    if unexpected:
        raise WeightsError(f"{source}: {len(unexpected)} unexpected {network} weights, e.g. {names(unexpected)}")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise WeightsError(f"{source}: {len(wrong)} {network} weights have the wrong shape, e.g. "
                           f"{model.to_authors(network, k)} is {tuple(state[k].shape)}, the model needs "
                           f"{tuple(expected[k].shape)} (is the config right for these weights?)")


def _materialize_buffers(module: torch.nn.Module, device) -> None:
    """Non-persistent buffers are not in any file: rebuild the ones still on the meta device."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise WeightsError(f"internal: buffer {name} has no value after loading")
        parent = module.get_submodule(name.rsplit(".", 1)[0])
        parent.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                               persistent=False)


#################################################################################
#                                  The three sources                             #
#################################################################################


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VidRDModel:
    """Build and load a model from any source; networks in eval mode, cast once to `dtype` on `device`."""
    kind = source.kind()
    if kind == "preset":
        name = source.model
        if not source.random_weights:
            raise WeightsError(f"--model {name} is an architecture, not weights: add --random-weights, or give a "
                               f"model folder (--model DIR) or the authors' files (--ckpt/--sd/--vae)")
        model = random_model(model_preset(name), dtype, device, source.weights_seed)
    elif kind == "converted":
        model = load_converted(Path(source.model), dtype, device)
    elif kind == "default":
        if not (DEFAULT_MODEL / CONFIG_FILE).is_file():
            raise WeightsError(f"the default model is missing from this installation ({DEFAULT_MODEL}); reinstall "
                               f"vidrd-rt or pass --model DIR")
        model = load_converted(DEFAULT_MODEL, dtype, device)
    else:
        model = load_authors(Path(source.ckpt), Path(source.sd_dir), source.vae_dir and Path(source.vae_dir), dtype,
                             device)
    return model.eval_()


def last_training_stage(source: ModelSource) -> dict:
    """The train_config of the last training stage recorded in the model folder's training.json ({} for presets,
    random weights, the authors' layout and folders without one). The shipped card lists stages; train.py writes
    one."""
    kind = source.kind()
    folder = DEFAULT_MODEL if kind == "default" else Path(source.model) if kind == "converted" else None
    info_file = folder / "training.json" if folder is not None else None
    if info_file is None or not info_file.is_file():
        return {}
    try:  # only a description of how the weights were made: unreadable means unknown, not an error
        info = json.loads(info_file.read_text())
        stages = info.get("stages", [info])
        config = (stages[-1] if stages else {}).get("train_config", {})
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return {}
    return config if isinstance(config, dict) else {}


def clean_held_overlap(source: ModelSource) -> int:
    """The M the model was trained to continue from with clean held frames (training/train.py --context-share and
    --context-frames), so that the sampler may show DSG's held frames clean (SamplerConfig.held_frames "clean");
    0 if it was not."""
    stage = last_training_stage(source)
    trained = isinstance(stage.get("context_share"), (int, float)) and stage["context_share"] > 0
    return int(stage.get("context_frames", 4)) if trained else 0


def random_model(config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> VidRDModel:
    """Every parameter drawn (none left zero), at scales that keep activations finite; for tests and benchmarks."""
    model = VidRDModel.build(config, device="meta")
    generator = torch.Generator(device=device).manual_seed(seed)
    for network, module in model.networks().items():
        state = {k: _random_tensor(k, v, generator, device) for k, v in module.state_dict().items()}
        authors = {model.to_authors(network, k): v for k, v in state.items()}
        assign_network(model, network, authors, dtype, device, source=f"random {config.name}")
    model.tokenizer = load_tokenizer(BUNDLED_TOKENIZER)
    return model


def _random_tensor(name: str, like: torch.Tensor, generator, device) -> torch.Tensor:
    if not like.is_floating_point():
        return torch.arange(like.shape[-1], device=device).expand(like.shape)
    x = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    if like.ndim >= 2:  # weights: unit-variance outputs for unit-variance inputs
        return x * like[0].numel() ** -0.5
    if name.endswith("bias"):
        return x * 0.02
    return 1.0 + 0.1 * x  # normalisation scales


def load_converted(folder: Path, dtype: torch.dtype, device: str) -> VidRDModel:
    """Our format: vidrd.json + one safetensors file per network (authors' key names) + tokenizer/."""
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder; --model takes tiny, vidrd-base or a folder made by vidrd-rt convert")
    meta = _read_json(folder / CONFIG_FILE)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{folder / CONFIG_FILE}: not a vidrd-rt model config (format {meta.get('format')!r})")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{folder / CONFIG_FILE}: malformed config ({_first_line(e)})") from None
    model = VidRDModel.build(config)
    for network in NETWORKS:
        path = folder / f"{network}.safetensors"
        assign_network(model, network, read_tensors(path), dtype, device, source=str(path))
    model.tokenizer = _tokenizer_from(folder / "tokenizer")
    return model


def save_converted(model: VidRDModel, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write our format atomically: a sibling temp folder renamed into place when complete. `dtype` casts the
    floating-point tensors (fp16 halves the files; loading casts to the run's dtype anyway)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise WeightsError(f"{folder}: already exists; choose a new folder for the converted model")
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "config": model.config.to_dict()}, indent=1))
        for network, module in model.networks().items():
            state = {model.to_authors(network, k): _cast(v.detach(), dtype).contiguous().cpu()
                     for k, v in module.state_dict().items() if not k.endswith("position_ids")}
            save_file(state, str(tmp / f"{network}.safetensors"))
        # Copy the tokenizer's own files (vocab.json + merges.txt): any transformers version reads those.
        shutil.copytree(model.tokenizer.name_or_path, tmp / "tokenizer")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


#################################################################################
#                            The authors' released layout                        #
#################################################################################


def load_authors(ckpt: Path, sd_dir: Path, vae_dir: Path | None, dtype: torch.dtype, device: str) -> VidRDModel:
    """ModelT2V.pth + the Stable Diffusion 2.1-base folder + the fine-tuned temporal VAE folder.

    As in the authors' code, the UNet and text encoder weights in the checkpoint override the SD folder's.
    """
    config = config_from_authors(sd_dir, vae_dir)
    model = VidRDModel.build(config)
    released = _split_checkpoint(ckpt)
    for network, subdir, stems in (("unet", "unet", ("diffusion_pytorch_model",)),
                                   ("text_encoder", "text_encoder", ("model", "pytorch_model"))):
        base_file = _find_weights(sd_dir / subdir, stems)
        state = read_tensors(base_file) if base_file else {}
        state.update(released.get(network, {}))
        assign_network(model, network, state, dtype, device, source=f"{ckpt} + {sd_dir / subdir}")
    vae_folder = vae_dir or sd_dir / "vae"
    vae_file = _find_weights(vae_folder, ("diffusion_pytorch_model",))
    if vae_file is None:
        raise WeightsError(f"{vae_folder}: no diffusion_pytorch_model.safetensors or .bin")
    assign_network(model, "vae", read_tensors(vae_file), dtype, device, source=str(vae_file))
    model.tokenizer = _tokenizer_from(sd_dir / "tokenizer")
    return model


def _split_checkpoint(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ModelT2V.pth's flat {'unet.<k>', 'text_encoder.<k>'} -> per network, prefix stripped."""
    state = read_tensors(ckpt)
    split: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in split:
            raise WeightsError(f"{ckpt}: unexpected key {key!r}; ModelT2V.pth holds only unet.* and text_encoder.*")
        split[prefix][rest] = tensor
    if not split["unet"]:
        raise WeightsError(f"{ckpt}: no unet.* weights; is this the VidRD ModelT2V.pth?")
    return split


def config_from_authors(sd_dir: Path, vae_dir: Path | None) -> ModelConfig:
    """Architecture read from the SD folder's and the VAE folder's config files (not assumed)."""
    if not sd_dir.is_dir():
        raise WeightsError(f"{sd_dir}: not a folder; --sd takes the stable-diffusion-2-1-base folder")
    unet = _unet_config(_read_json(sd_dir / "unet" / "config.json"), sd_dir / "unet" / "config.json")
    vae_path = (vae_dir or sd_dir / "vae") / "config.json"
    vae = _vae_config(_read_json(vae_path), vae_path)
    text = _pick(TextEncoderConfig, _read_json(sd_dir / "text_encoder" / "config.json"))
    scheduler_path = sd_dir / "scheduler" / "scheduler_config.json"
    scheduler = _pick(SchedulerConfig, _read_json(scheduler_path)) if scheduler_path.is_file() else SchedulerConfig()
    return ModelConfig(name=f"vidrd:{sd_dir.name}", unet=unet, vae=vae, text_encoder=text, scheduler=scheduler)


def _pick(cls, raw: dict):
    fields = cls.__dataclass_fields__
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in fields})


def _unet_config(raw: dict, path: Path) -> UNetConfig:
    if not raw.get("use_linear_projection", False):
        raise WeightsError(f"{path}: use_linear_projection is false; VidRD builds on SD 2.x (linear projections)")
    channels = tuple(raw.get("block_out_channels", ()))
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)  # SD 2.x: the value is heads
    heads = tuple(heads) if isinstance(heads, list) else (heads,) * len(channels)
    try:
        return UNetConfig(
            in_channels=raw.get("in_channels", 4), out_channels=raw.get("out_channels", 4),
            block_out_channels=channels, layers_per_block=raw.get("layers_per_block", 2), attention_heads=heads,
            cross_attention_dim=raw["cross_attention_dim"], norm_num_groups=raw.get("norm_num_groups", 32),
            norm_eps=raw.get("norm_eps", 1e-5), flip_sin_to_cos=raw.get("flip_sin_to_cos", True),
            freq_shift=raw.get("freq_shift", 0), sample_size=32,
        )
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: unusable UNet config ({_first_line(e)})") from None


def _vae_config(raw: dict, path: Path) -> VAEConfig:
    try:
        return VAEConfig(
            in_channels=raw.get("in_channels", 3), out_channels=raw.get("out_channels", 3),
            block_out_channels=tuple(raw["block_out_channels"]), layers_per_block=raw.get("layers_per_block", 2),
            latent_channels=raw.get("latent_channels", 4), norm_num_groups=raw.get("norm_num_groups", 32),
            scaling_factor=raw.get("scaling_factor", 0.18215), temporal_decoder=bool(raw.get("add_temp_conv", False)),
        )
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: unusable VAE config ({_first_line(e)})") from None


def _tokenizer_from(folder: Path):
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise WeightsError(f"{folder}: tokenizer files vocab.json and merges.txt not found")
    return load_tokenizer(folder)
