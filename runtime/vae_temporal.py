"""The temporal VAE: SD 2.1's AutoencoderKL whose decoder runs a Temp-Conv after every up-block ResNet.

The encoder and the 2D decoder blocks come from diffusers; only the block that interleaves ResNets with
Temp-Conv layers is written here. Temp-Conv layers act when a clip of more than one frame is decoded.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.resnet import ResnetBlock2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from torch import nn

from .config import VAEConfig
from .layers import TemporalConv


class TemporalUpDecoderBlock(nn.Module):
    """UpDecoderBlock2D with a Temp-Conv after each ResNet (authors' vae/modules.py layout)."""

    def __init__(self, cfg: VAEConfig, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, eps=1e-6, groups=cfg.norm_num_groups)
            for i in range(n)
        )
        if cfg.temporal_decoder:
            self.temp_convs = nn.ModuleList(TemporalConv(out_channels, cfg.temporal_conv_layers, 0.1) for _ in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if upsample else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, None)  # (BF, C, H, W)
            if hasattr(self, "temp_convs"):
                x = self.temp_convs[i](x, frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class TemporalDecoder(nn.Module):
    """Latents (B*F, 4, h, w) of clips of `frames` frames -> images (B*F, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = list(reversed(cfg.block_out_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            TemporalUpDecoderBlock(cfg, ch[max(i - 1, 0)], ch[i], upsample=i < len(ch) - 1) for i in range(len(ch))
        )
        # Registered after up_blocks, as in the authors' module, so keys come out in their order.
        self.mid_block = UNetMidBlock2D(in_channels=ch[0], temb_channels=None, resnet_eps=1e-6,
                                        attention_head_dim=ch[0], resnet_groups=cfg.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (BF, C, h, w)
        for block in self.up_blocks:
            x = block(x, frames)  # upsampled x2 per block but the last
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (BF, 3, H, W)


class TemporalVAE(nn.Module):
    """AutoencoderKL with the temporal decoder; key names as the authors' TemporalAutoencoderKL."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        self.encoder = Encoder(in_channels=cfg.in_channels, out_channels=cfg.latent_channels,
                               down_block_types=("DownEncoderBlock2D",) * len(ch), block_out_channels=ch,
                               layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                               double_z=True)
        self.decoder = TemporalDecoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> unscaled posterior mean (N, 4, h, w)."""
        moments = self.quant_conv(self.encoder(images))
        return moments.chunk(2, dim=1)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, F, h, w) -> video (B, 3, F, H, W) in [-1, 1]; Temp-Conv active when F > 1."""
        b, c, frames, h, w = latents.shape
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)  # (BF, 4, h, w)
        x = self.decoder(self.post_quant_conv(z), frames)  # (BF, 3, H, W)
        return x.reshape(b, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)


class VideoDecoder(nn.Module):
    """Export-friendly decoder: diffusion latents (B, 4, F, h, w) -> frames (B, 3, F, H, W) in [0, 1].

    `per_frame=True` decodes each frame alone (Temp-Conv inactive), as the authors' sampling code does.
    """

    def __init__(self, vae: TemporalVAE, per_frame: bool = False):
        super().__init__()
        self.vae = vae
        self.per_frame = per_frame

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, frames, h, w = latents.shape
        z = latents / self.vae.config.scaling_factor
        if self.per_frame:
            z = z.permute(0, 2, 1, 3, 4).reshape(b * frames, c, 1, h, w)  # each frame a clip of one
        video = self.vae.decode(z)  # (B', 3, F', H, W)
        if self.per_frame:
            video = video.reshape(b, frames, *video.shape[1:2], *video.shape[3:]).permute(0, 2, 1, 3, 4)
        return (video.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, F, H, W)
