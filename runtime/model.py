"""One VidRD model: its config, its three networks and its tokenizer, plus the authors' key names for each."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .text_encoder import TextEncoder
from .unet3d import UNet3D
from .vae_temporal import TemporalVAE

NETWORKS = ("unet", "vae", "text_encoder")

# diffusers 0.14 named the VAE's attention projections query/key/value/proj_attn; today's diffusers uses to_*.
_VAE_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_OLD = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_VAE_NEW = re.compile(r"(\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")


def vae_key_to_ours(key: str) -> str:
    return _VAE_OLD.sub(lambda m: m.group(1) + _VAE_ATTENTION_RENAMES[m.group(2)] + ".", key)


def vae_key_to_authors(key: str) -> str:
    back = {v: k for k, v in _VAE_ATTENTION_RENAMES.items()}
    return _VAE_NEW.sub(lambda m: m.group(1) + back[m.group(2)] + ".", key)


def text_key_to_ours(key: str, text_encoder: TextEncoder) -> str:
    """Authors' 'text_model.X' (transformers 4.x) -> our module's name for X, whatever transformers we run."""
    rest = key[len("text_model."):] if key.startswith("text_model.") else key
    nested = hasattr(text_encoder.model, "text_model")  # transformers < 5 nests a text_model module
    return "model." + ("text_model." if nested else "") + rest


def text_key_to_authors(key: str) -> str:
    rest = key[len("model."):]
    return rest if rest.startswith("text_model.") else "text_model." + rest


@dataclass
class VidRDModel:
    """The networks of one model. `tokenizer` is a transformers CLIPTokenizer."""

    config: ModelConfig
    unet: UNet3D
    vae: TemporalVAE
    text_encoder: TextEncoder
    tokenizer: Any = None

    @classmethod
    def build(cls, config: ModelConfig, device: str | torch.device = "meta") -> "VidRDModel":
        """Networks with uninitialised storage on `device` (meta by default: no memory until weights arrive)."""
        with torch.device(device):
            return cls(config, UNet3D(config.unet), TemporalVAE(config.vae), TextEncoder(config.text_encoder))

    def networks(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to_ours(self, network: str, key: str) -> str:
        if network == "vae":
            return vae_key_to_ours(key)
        if network == "text_encoder":
            return text_key_to_ours(key, self.text_encoder)
        return key

    @staticmethod
    def to_authors(network: str, key: str) -> str:
        if network == "vae":
            return vae_key_to_authors(key)
        if network == "text_encoder":
            return text_key_to_authors(key)
        return key

    def authors_layout(self) -> dict[str, list[list]]:
        """Per network, [authors' name, shape, dtype] for every tensor of the state dict."""
        return {
            name: [[self.to_authors(name, k), list(v.shape), str(v.dtype).removeprefix("torch.")]
                   for k, v in net.state_dict().items()]
            for name, net in self.networks().items()
        }

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Per network, total parameters and those in temporal layers (names containing 'temp')."""
        counts = {}
        for name, net in self.networks().items():
            params = list(net.named_parameters())
            counts[name] = {
                "total": sum(p.numel() for _, p in params),
                "temporal": sum(p.numel() for n, p in params if "temp" in n),
            }
        return counts

    def eval_(self) -> "VidRDModel":
        for net in self.networks().values():
            net.eval().requires_grad_(False)
        return self
