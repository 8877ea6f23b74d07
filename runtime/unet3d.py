"""The VidRD temporal UNet: SD 2.1's UNet inflated over frames, with Temp-Conv and Temp-Attn layers.

Module and parameter names reproduce the authors' state-dict keys, so their checkpoint loads with shape checks
only. Inside, frames are folded into the batch: (B*F, C, H, W). The public forward takes and returns the authors'
(B, C, F, H, W) layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .config import UNetConfig
from .layers import (
    Attention,
    ClipGroupNorm,
    FeedForward,
    TemporalConv,
    frame_position_embedding,
    from_tokens,
    temporal_attention_form,
    to_tokens,
)

#################################################################################
#                                     ResNet                                     #
#################################################################################


class ResnetBlock3D(nn.Module):
    """SD ResNet block on folded frames; both GroupNorms see the whole clip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, eps: float, groups: int):
        super().__init__()
        self.norm1 = ClipGroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = ClipGroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, frames)))  # (BF, Cout, H, W)
        t = self.time_emb_proj(F.silu(temb))  # (B, Cout) one timestep per clip, or (BF, Cout) one per frame
        if t.shape[0] != h.shape[0]:
            t = t[:, None, :].expand(-1, frames, -1).reshape(-1, t.shape[-1])  # (BF, Cout): same for every frame
        h = h + t[:, :, None, None]  # (BF, Cout, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h, frames))))  # (BF, Cout, H, W)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


#################################################################################
#                                   Transformer                                  #
#################################################################################


class TransformerBlock(nn.Module):
    """Self-attn, cross-attn, Temp-Attn (with frame-position embedding), feed-forward; pre-LayerNorm residuals."""

    def __init__(self, dim: int, heads: int, context_dim: int, temporal_position_embedding: bool):
        super().__init__()
        # Registration order follows the authors' module so state_dict() lists keys in their order.
        self.attn1 = Attention(dim, heads)
        self.temp_norm = nn.LayerNorm(dim)
        self.temp_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.temporal_position_embedding = temporal_position_embedding
        self.temporal_attention = "sdpa"  # how Temp-Attn runs: layers.TEMPORAL_ATTENTION, set_temporal_attention

    def forward(self, h: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        bf, hw, c = h.shape
        h = h + self.attn1(self.norm1(h))  # (BF, HW, C) spatial self-attention per frame
        # The prompt is the same for every frame of a clip: attend from all F*HW queries of a clip at once.
        hq = h.reshape(bf // frames, frames * hw, c)  # (B, F*HW, C)
        h = (hq + self.attn2(self.norm2(hq), context)).reshape(bf, hw, c)  # (BF, HW, C)
        h = self._temporal(h, frames)
        return h + self.ff(self.norm3(h))  # (BF, HW, C)

    def _temporal(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        bf, hw, c = h.shape
        h = h.reshape(bf // frames, frames, hw, c)  # (B, F, HW, C)
        if self.temporal_position_embedding:
            # Added to the residual stream itself (also for a single frame, as the authors' in-place add does).
            h = h + frame_position_embedding(frames, c, h.device, h.dtype)[None, :, None, :]
        layout, attend = temporal_attention_form(self.temporal_attention)
        if frames > 1 and layout == "tokens":
            ht = h.permute(0, 2, 1, 3).reshape(-1, frames, c)  # (B*HW, F, C): attention along time per pixel
            ht = ht + self.temp_attn(self.temp_norm(ht), attend=attend)
            h = ht.reshape(bf // frames, hw, frames, c).permute(0, 2, 1, 3)  # (B, F, HW, C)
        elif frames > 1:
            h = h + self.temp_attn.forward_along_frames(self.temp_norm(h), attend)  # (B, F, HW, C)
        return h.reshape(bf, hw, c)


class Transformer3D(nn.Module):
    """Spatial transformer on folded frames: GroupNorm per frame, linear projections in and out."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, temporal_position_embedding: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim, temporal_position_embedding)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.proj_in(to_tokens(self.norm(x)))  # (BF, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context, frames)
        return x + from_tokens(self.proj_out(h), height, width)  # (BF, C, H, W)


#################################################################################
#                                  UNet blocks                                   #
#################################################################################


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetBlock(nn.Module):
    """One down, mid or up block: per layer ResNet -> Temp-Conv -> (transformer); then optional resampling.

    `skip_channels[i]` is the width of the skip connection concatenated before layer i (up blocks only).
    """

    def __init__(self, cfg: UNetConfig, in_channels: list[int], out_channels: int, heads: int | None,
                 resample: str | None, skip_channels: list[int] | None = None):
        super().__init__()
        temb, eps, groups = cfg.time_embed_dim, cfg.norm_eps, cfg.norm_num_groups
        skips = skip_channels or [0] * len(in_channels)
        if heads is not None:  # registration order as in the authors' blocks: attentions, resnets, temp_convs
            self.attentions = nn.ModuleList(
                Transformer3D(out_channels, heads, cfg.cross_attention_dim, groups, cfg.temporal_position_embedding)
                for _ in in_channels
            )
        self.resnets = nn.ModuleList(
            ResnetBlock3D(c + s, out_channels, temb, eps, groups) for c, s in zip(in_channels, skips)
        )
        self.temp_convs = nn.ModuleList(TemporalConv(out_channels, cfg.temporal_conv_layers, 0.1) for _ in in_channels)
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])
        self.has_skips = skip_channels is not None

    def forward(self, x, temb, context, frames: int, skips: list[torch.Tensor] | None = None):
        outputs = []
        for i, (resnet, temp_conv) in enumerate(zip(self.resnets, self.temp_convs)):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)  # (BF, C + Cskip, H, W)
            x = temp_conv(resnet(x, temb, frames), frames)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, frames)
            outputs.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            outputs.append(x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x, outputs


class MidBlock(nn.Module):
    """ResNet -> Temp-Conv -> [transformer -> ResNet -> Temp-Conv] at the lowest resolution."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c, temb, eps, groups = cfg.block_out_channels[-1], cfg.time_embed_dim, cfg.norm_eps, cfg.norm_num_groups
        heads = cfg.attention_heads[-1]
        self.attentions = nn.ModuleList(
            [Transformer3D(c, heads, cfg.cross_attention_dim, groups, cfg.temporal_position_embedding)]
        )
        self.resnets = nn.ModuleList(ResnetBlock3D(c, c, temb, eps, groups) for _ in range(2))
        self.temp_convs = nn.ModuleList(TemporalConv(c, cfg.temporal_conv_layers, 0.1) for _ in range(2))

    def forward(self, x, temb, context, frames: int):
        x = self.temp_convs[0](self.resnets[0](x, temb, frames), frames)
        x = self.attentions[0](x, context, frames)
        return self.temp_convs[1](self.resnets[1](x, temb, frames), frames)


#################################################################################
#                                      UNet                                      #
#################################################################################


class UNet3D(nn.Module):
    """forward(sample (B, 4, F, h, w), timestep (B,) or (B, F), context (B, L, D)) -> noise prediction like sample.

    Each batch element has its own timestep, so classifier-free guidance halves and several clips at different
    denoising steps can share one call. A (B, F) timestep gives each frame its own noise level (the time embedding
    is added per folded frame anyway): a model trained so can be shown some frames clean (DSG's held frames,
    SamplerConfig.held_frames).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(self._down_block(i) for i in range(len(ch)))
        self.up_blocks = nn.ModuleList(self._up_block(i) for i in range(len(ch)))
        self.mid_block = MidBlock(cfg)  # registered after up_blocks, as in the authors' module
        self.conv_norm_out = ClipGroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _down_block(self, i: int) -> UNetBlock:
        ch, last = self.config.block_out_channels, i == len(self.config.block_out_channels) - 1
        in_channels = [ch[max(i - 1, 0)]] + [ch[i]] * (self.config.layers_per_block - 1)
        heads = None if last else self.config.attention_heads[i]  # the deepest down block has no attention
        return UNetBlock(self.config, in_channels, ch[i], heads, None if last else "down")

    def _up_block(self, i: int) -> UNetBlock:
        rev, heads = list(reversed(self.config.block_out_channels)), list(reversed(self.config.attention_heads))
        n = self.config.layers_per_block + 1
        prev_out = rev[max(i - 1, 0)]
        skip_in = rev[min(i + 1, len(rev) - 1)]
        in_channels = [prev_out] + [rev[i]] * (n - 1)
        skip_channels = [rev[i]] * (n - 1) + [skip_in]
        first, last = i == 0, i == len(rev) - 1
        return UNetBlock(self.config, in_channels, rev[i], None if first else heads[i], None if last else "up",
                         skip_channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, frames, height, width = sample.shape
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * frames, -1, height, width)  # (BF, 4, h, w)
        x = x.contiguous(memory_format=torch.channels_last)  # physically (B, F, h, w, C): see layers.py
        steps = timestep.reshape(-1) if timestep.ndim == 2 else timestep.expand(b)  # (BF,) per frame, else (B,)
        temb = self.time_embedding(self.time_proj(steps).to(sample.dtype))  # (BF or B, 4*C0)
        context = context.to(sample.dtype)
        x = self.conv_in(x)  # (BF, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, outputs = block(x, temb, context, frames)
            skips += outputs
        x = self.mid_block(x, temb, context, frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            x, _ = block(x, temb, context, frames, skips[-n:])
            del skips[-n:]
        x = self.conv_out(self.conv_act(self.conv_norm_out(x, frames)))  # (BF, 4, h, w)
        return x.reshape(b, frames, -1, height, width).permute(0, 2, 1, 3, 4)  # (B, 4, F, h, w)
