"""Train the default model from scratch on synthetic scenes: first the temporal VAE, then UNet + text encoder.

    python -m vidrd_rt.training.train --out runs/shapes --device cuda --vae-minutes 1.5 --unet-minutes 6.5

Data is drawn on the fly by training/scenes.py on the training device; nothing is downloaded. The model folder
written at the end (and every few minutes, so a cut-off run still leaves weights) is our converted format: it
loads with `--model DIR`, and becomes the shipped default when copied to runtime/assets/default_model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..runtime.config import model_preset
from ..runtime.layers import TemporalConv
from ..runtime.ddim import alphas_cumprod
from ..runtime.model import VidRDModel
from ..runtime.text_encoder import load_tokenizer, tokenize
from ..runtime.weights import load_converted, save_converted
from .scenes import SceneConfig, sample_batch
from .tokenizer import build_tokenizer
from .vocab import time_reversed_caption


@dataclass(frozen=True)
class TrainConfig:
    out: str
    device: str = "cuda"
    seed: int = 0
    vae_minutes: float = 1.5
    unet_minutes: float = 6.5
    vae_batch: int = 32  # clips per VAE step
    vae_frames: int = 6  # frames of each clip the VAE sees (enough for its (3,1,1) Temp-Convs; more clips instead)
    unet_batch: int = 96  # clips of 16 frames per diffusion step
    vae_lr: float = 1e-3
    unet_lr: float = 4e-4
    kl_weight: float = 1e-5  # small: a near-deterministic autoencoder, as SD's VAE
    uncond_prob: float = 0.1  # caption dropped this often, for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    ema_decay: float = 0.998
    save_every_minutes: float = 2.0
    max_steps: int = 0  # stop each stage after this many steps too (0: time only; for smoke tests)
    init: str = ""  # continue from this model folder (its VAE is kept: pass --vae-minutes 0)
    object_weight: float = 10.0  # extra diffusion-loss weight where the object is (see object_weights)
    # Share of clips whose timestep comes from the noisier half of the schedule. There a sample's layout and motion
    # are decided, and only the caption tells the direction; elsewhere the noisy input already shows it.
    high_noise_share: float = 0.0
    motion_share: float = 0.6  # share of straight-motion clips in the data (SceneConfig.p_motion)
    action_share: float = 0.2  # bouncing/growing/shrinking clips; the rest are pseudo-videos
    # Time-reversal contrast (reversal_contrast): its weight (0: off), how many clips of a batch get it (one more
    # UNet pass over them), and how sharply it saturates (a relative error gap of ~2/sharpness counts as learnt).
    reversal_weight: float = 0.0
    reversal_clips: int = 32
    reversal_sharpness: float = 50.0
    # Only clips drawn at or above this timestep get the contrast: below it the noisy clip already shows its motion,
    # and the contrast can be met by checking the caption against it instead of drawing the motion it asks for.
    # Measured (stage 6): 600 and 0 gave the same direction accuracy. At 800 the number of chosen clips varies from
    # batch to batch and the run made half the steps (463 vs 967 in 4.6 min); likely cuDNN autotuning each new
    # batch size (train() sets cudnn.benchmark), not measured.
    reversal_min_timestep: int = 0
    # Straight-motion clips on a torus (SceneConfig.wrap): shapes leave by one edge and come back by the other, so
    # the next clip of a long video can always go on the same way. Recorded in training.json; `vidrd-rt eval`
    # reads it to measure positions around the torus.
    wrap: bool = False
    # Continuations (held_frames "clean" in the sampler): this share of each batch is laid out as a clip that DSG
    # prompts, the previous clip's last M frames reversed and then onwards (continuation_order), and its first M
    # frames are given clean at timestep 0; the loss covers the other frames. 0: off (the paper's training).
    context_share: float = 0.0
    context_frames: int = 4  # M of the sampler this trains for
    # Each continuation holds a random 1..M of its first frames clean instead of all M (stage 10's first half; the
    # sampler holds all M, which is what the second half trained for).
    context_random_held: bool = False

    def __post_init__(self):
        if not 0.0 <= self.context_share <= 1.0:
            raise ValueError(f"--context-share must be in [0, 1] (got {self.context_share})")
        if not 0 <= self.context_frames < 16:
            raise ValueError(f"--context-frames must be in [0, 16) for 16-frame clips (got {self.context_frames})")


#################################################################################
#                                   Setup                                        #
#################################################################################


def build_model(cfg: TrainConfig, tokenizer_dir: Path) -> VidRDModel:
    """The `shapes` architecture with the token ids of the freshly built tokenizer, randomly initialised."""
    tokenizer = load_tokenizer(tokenizer_dir)
    preset = model_preset("shapes")
    text = dataclasses.replace(preset.text_encoder, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the shapes text encoder {text.vocab_size}")
    config = dataclasses.replace(preset, name="shapes-default", text_encoder=text)
    torch.manual_seed(cfg.seed)
    model = VidRDModel.build(config, device=cfg.device)
    model.tokenizer = tokenizer
    zero_last_temporal_convs(model)
    return model


@torch.no_grad()
def zero_last_temporal_convs(model: VidRDModel) -> None:
    """Each Temp-Conv block starts as the identity (its last conv zeroed), as the authors initialise it: the
    residual stream begins as a per-frame network and learns to look across frames."""
    for network in (model.unet, model.vae):
        for module in network.modules():
            if isinstance(module, TemporalConv):
                module.convs[-1].weight.zero_()
                module.convs[-1].bias.zero_()


def scenes_for(model: VidRDModel, cfg: TrainConfig | None = None) -> SceneConfig:
    shares = {} if cfg is None else {"p_motion": cfg.motion_share, "p_action": cfg.action_share, "wrap": cfg.wrap}
    return SceneConfig(size=model.config.height, frames=16, **shares)


class Clock:
    """Wall-clock budget of one stage, and a log line now and then."""

    def __init__(self, minutes: float, max_steps: int, name: str):
        self.start, self.budget, self.max_steps, self.name = time.time(), minutes * 60, max_steps, name
        self.step = 0

    def running(self) -> bool:
        return time.time() - self.start < self.budget and not (self.max_steps and self.step >= self.max_steps)

    def tick(self, loss: torch.Tensor, reversal_gap: torch.Tensor | None = None) -> None:
        """Count a step; read the loss (a host sync) only on the steps that print it."""
        self.step += 1
        if self.step in (1, 10, 50, 100) or self.step % 250 == 0:
            gap = "" if reversal_gap is None else f"  reversal gap {reversal_gap.item():+.4f}"
            print(f"{self.name} step {self.step:5d}  {time.time() - self.start:6.1f}s  loss {loss.item():.4f}{gap}",
                  flush=True)


#################################################################################
#                                 Stage 1: VAE                                   #
#################################################################################


def object_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights (BF, 1, H, W): saturated pixels (the objects, ~2% of the image) count ~25x, so the
    small VAE spends its capacity on colour and shape before background texture."""
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2  # x in [-1, 1]
    return 1 + 30 * saturation


def vae_loss(vae, video: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Object-weighted reconstruction (L1 + L2) of clips through the temporal decoder, plus a small KL term."""
    b, _, frames, h, w = video.shape
    x = video.transpose(1, 2).reshape(b * frames, 3, h, w) * 2 - 1  # (BF, 3, H, W) in [-1, 1]
    mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)  # (BF, 4, h/8, w/8) each
    logvar = logvar.clamp(-30, 20)
    z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
    z = z.reshape(b, frames, *z.shape[1:]).transpose(1, 2)  # (B, 4, F, h/8, w/8)
    recon = vae.decode(z).transpose(1, 2).reshape_as(x)  # (BF, 3, H, W)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    weight = object_weights(x)
    err = (recon.float() - x).abs()
    return ((err + err * err) * weight).mean() / weight.mean() + kl_weight * kl


def train_vae(model: VidRDModel, cfg: TrainConfig, generator: torch.Generator) -> float:
    """Train the VAE; returns the latent scaling factor (1 / std of the posterior means), as SD defines it."""
    vae = model.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    clock, scenes = Clock(cfg.vae_minutes, cfg.max_steps, "vae"), scenes_for(model)
    while clock.running():
        video, _ = sample_batch(scenes, cfg.vae_batch, generator, cfg.device)
        video = video[:, :, : cfg.vae_frames]
        with torch.autocast(device_type=_device_type(cfg), dtype=torch.bfloat16, enabled=_cuda(cfg)):
            loss = vae_loss(vae, video, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        clock.tick(loss.detach())
    vae.eval().requires_grad_(False)
    return latent_scale(model, scenes, generator, cfg.device)


@torch.no_grad()
def latent_scale(model: VidRDModel, scenes: SceneConfig, generator, device) -> float:
    video, _ = sample_batch(scenes, 32, generator, device)
    return 1.0 / float(encode_latents(model, video, 1.0).std())


def encode_latents(model: VidRDModel, video: torch.Tensor, scale: float) -> torch.Tensor:
    """Clips (B, 3, F, H, W) in [0, 1] -> scaled latents (B, 4, F, h, w)."""
    b, _, frames, h, w = video.shape
    x = video.transpose(1, 2).reshape(b * frames, 3, h, w) * 2 - 1
    z = model.vae.encode_mean(x.float()) * scale  # (BF, 4, h, w)
    return z.reshape(b, frames, *z.shape[1:]).transpose(1, 2)


#################################################################################
#                          Stage 2: UNet + text encoder                          #
#################################################################################


def latent_object_weights(video: torch.Tensor, size: int, extra: float) -> torch.Tensor:
    """(B, 1, F, h, w) weights: 1 + extra where the object covers a latent cell. The object is ~2% of the
    pixels; unweighted, the loss is mostly background and the model learns appearance long before motion."""
    b, _, frames, h, w = video.shape
    saturation = video.amax(dim=1) - video.amin(dim=1)  # (B, F, H, W) in [0, 1]
    cells = F.adaptive_max_pool2d(saturation.reshape(b * frames, 1, h, w), size)  # (BF, 1, h', w')
    return 1 + extra * cells.reshape(b, frames, 1, size, size).transpose(1, 2)


def training_timesteps(b: int, steps: int, high_share: float, generator, device) -> torch.Tensor:
    """(b,) timesteps, uniform over the schedule, except that a share high_share of them comes from its upper half."""
    t = torch.randint(0, steps, (b,), device=device, generator=generator)
    high = torch.randint(steps // 2, steps, (b,), device=device, generator=generator)
    pick = torch.rand(b, device=device, generator=generator) < high_share
    return torch.where(pick, high, t)


def clip_errors(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean squared epsilon error of each clip, weighted per cell if weights are given, over the frames
    `keep` (B, 1, F, 1, 1) marks if given (the others are given clean: nothing to predict)."""
    err = (pred.float() - noise).pow(2)
    if weights is None and keep is None:
        return err.mean(dim=(1, 2, 3, 4))
    w = torch.ones_like(err[:, :1]) if weights is None else weights.float()  # (B, 1, F, h, w)
    w = w if keep is None else w * keep
    return (err * w).sum(dim=(1, 2, 3, 4)) / (w.sum(dim=(1, 2, 3, 4)) * err.shape[1])


def continuation_order(frames: int, overlap: int) -> list[int]:
    """Scene frame of each clip frame when the clip continues another the way FNR and DSG lay it out: frame j < M
    shows the previous clip's frame N-1-j (scene frames M-1 .. 0 here), and the clip goes on from there (1 ..)."""
    return list(range(overlap - 1, -1, -1)) + list(range(1, frames - overlap + 1))


def context_layout(video: torch.Tensor, share: float, overlap: int, random_held: bool = False,
                   generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first round(share * B) clips of a batch become continuations (continuation_order); returns the video and
    (B,) how many leading frames of each clip are given clean (M for those, or 1..M at random with random_held;
    0 for the rest)."""
    b, frames = video.shape[0], video.shape[2]
    count = round(share * b)
    held = torch.zeros(b, dtype=torch.long, device=video.device)
    if count == 0 or overlap == 0:
        return video, held
    order = torch.tensor(continuation_order(frames, overlap), device=video.device)
    video = torch.cat([video[:count].index_select(2, order), video[count:]])
    held[:count] = overlap
    if random_held:
        held[:count] = torch.randint(1, overlap + 1, (count,), device=video.device, generator=generator)
    return video, held


def reversal_contrast(err_true: torch.Tensor, err_reversed: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Logistic loss that a clip's own caption predicts its noise better than the caption of the clip played
    backwards ('moving right' for a clip moving left), on the same noisy input: the only difference between the
    two captions is the arrow of time, which the plain diffusion loss teaches slowly (a reversed caption barely
    changes it, and the model learnt the axis of motion long before its sign). Each clip's term is scaled by its
    own error level, so it weighs like the diffusion loss at every timestep."""
    scale = ((err_true + err_reversed) / 2).detach()
    return (scale * F.softplus(sharpness * (err_true - err_reversed) / scale)).mean()


@dataclass(frozen=True)
class Reversal:
    """The clips of a batch that get the time-reversal contrast, and their reversed captions' token ids."""

    index: torch.Tensor  # (E,) long: every clip whose caption has a reversed version
    ids: torch.Tensor  # (E, 77)
    weight: float
    sharpness: float
    clips: int = 32  # at most this many of them get it
    min_timestep: int = 0  # only those drawn at or above this timestep

    def chosen(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, reversed ids) of the clips that get the contrast, given the batch's timesteps."""
        keep = (t[self.index] >= self.min_timestep).nonzero().squeeze(1)[: self.clips]
        return self.index[keep], self.ids[keep]


def reversal_for(tokenizer, captions: list[str], cfg: TrainConfig) -> Reversal | None:
    """The clips whose caption has a time-reversed version (None if the contrast is off or none has)."""
    if cfg.reversal_weight <= 0:
        return None
    pairs = [(i, r) for i, r in enumerate(map(time_reversed_caption, captions)) if r is not None]
    if not pairs:
        return None
    index = torch.tensor([i for i, _ in pairs], device=cfg.device)
    ids = tokenize(tokenizer, [r for _, r in pairs]).to(cfg.device)
    return Reversal(index, ids, cfg.reversal_weight, cfg.reversal_sharpness, cfg.reversal_clips,
                    cfg.reversal_min_timestep)


def diffusion_loss(model, latents, ids, alphas: torch.Tensor, gamma: float, generator,
                   weights: torch.Tensor | None = None, high_share: float = 0.0,
                   reversal: Reversal | None = None,
                   held: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Epsilon prediction at a random training timestep per clip, Min-SNR weighted (and per cell, if given), plus
    the time-reversal contrast on the clips `reversal` names. `held` (B,): the first held[b] frames of clip b are
    given clean at timestep 0 and left out of the loss. Returns the loss and, with a contrast, the mean relative
    error gap of the reversed captions (> 0: the model tells the arrow of time from the caption)."""
    b, frames = latents.shape[0], latents.shape[2]
    t = training_timesteps(b, alphas.numel(), high_share, generator, latents.device)
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    a = alphas[t].view(b, 1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    steps, keep = t, None
    if held is not None:  # (no host sync: a batch without continuations gets held=None from the caller)
        clean = torch.arange(frames, device=latents.device)[None] < held[:, None]  # (B, F)
        steps = torch.where(clean, 0, t[:, None])  # (B, F): a timestep per frame
        noisy = torch.where(clean[:, None, :, None, None], latents, noisy)
        keep = (~clean).float()[:, None, :, None, None]  # (B, 1, F, 1, 1)
    per_clip = clip_errors(model.unet(noisy, steps, model.text_encoder(ids)), noise, weights, keep)
    snr = alphas[t] / (1 - alphas[t])
    weight = snr.clamp(max=gamma) / snr  # Min-SNR-gamma for epsilon prediction
    loss = (weight * per_clip).mean()
    if reversal is not None and keep is not None:
        t = torch.where(held > 0, -1, t)  # continuations are not asked to tell the arrow of time
    i, reversed_ids = reversal.chosen(t) if reversal is not None else (None, None)
    if i is None or i.numel() == 0:
        return loss, None
    pred = model.unet(noisy[i], t[i], model.text_encoder(reversed_ids))
    err_reversed = clip_errors(pred, noise[i], None if weights is None else weights[i])
    gap = ((err_reversed - per_clip[i]) / (err_reversed + per_clip[i]) * 2).mean().detach()
    return loss + reversal.weight * reversal_contrast(per_clip[i], err_reversed, reversal.sharpness), gap


def drop_captions(captions: list[str], prob: float, generator) -> list[str]:
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= prob
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def train_unet(model: VidRDModel, cfg: TrainConfig, scale: float, generator, save) -> dict:
    """UNet and text encoder trained together from scratch; EMA weights are what gets saved."""
    nets = torch.nn.ModuleDict({"unet": model.unet.train(), "text_encoder": model.text_encoder.train()})
    ema = copy.deepcopy(nets).eval().requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    warmup = lambda step: min(1.0, (step + 1) / 200)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    alphas = alphas_cumprod(model.config.scheduler).to(cfg.device)
    clock, scenes, last_save = Clock(cfg.unet_minutes, cfg.max_steps, "unet"), scenes_for(model, cfg), time.time()
    while clock.running():
        video, captions = sample_batch(scenes, cfg.unet_batch, generator, cfg.device)
        video, held = context_layout(video, cfg.context_share, cfg.context_frames,
                                     cfg.context_random_held, generator)
        captions = drop_captions(captions, cfg.uncond_prob, generator)
        ids = tokenize(model.tokenizer, captions).to(cfg.device)
        reversal = reversal_for(model.tokenizer, captions, cfg)
        with torch.no_grad():
            latents = encode_latents(model, video, scale)
        with torch.autocast(device_type=_device_type(cfg), dtype=torch.bfloat16, enabled=_cuda(cfg)):
            weights = latent_object_weights(video, latents.shape[-1], cfg.object_weight)
            loss, gap = diffusion_loss(model, latents, ids, alphas, cfg.min_snr_gamma, generator, weights,
                                       cfg.high_noise_share, reversal, held if cfg.context_share > 0 else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        sched.step()
        update_ema(ema, nets, min(cfg.ema_decay, (1 + clock.step) / (10 + clock.step)))
        clock.tick(loss.detach(), gap)
        if time.time() - last_save > cfg.save_every_minutes * 60:
            save(ema, clock.step)
            last_save = time.time()
    return {"ema": ema, "steps": clock.step}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1 - decay)


#################################################################################
#                                   Saving                                       #
#################################################################################


def save_model(model: VidRDModel, ema: torch.nn.Module, scale: float, folder: Path, info: dict) -> None:
    """Our model folder with the EMA weights in fp16 (half the size; loading casts to the run's dtype)."""
    config = dataclasses.replace(model.config, vae=dataclasses.replace(model.config.vae, scaling_factor=scale))
    snapshot = VidRDModel(config=config, unet=ema["unet"], vae=model.vae, text_encoder=ema["text_encoder"],
                          tokenizer=model.tokenizer)
    tmp = folder.with_name(folder.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    save_converted(snapshot, tmp, dtype=torch.float16)
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)  # replace the previous snapshot only once the new one is complete
    os.replace(tmp, folder)
    print(f"saved {folder} ({info.get('unet_steps', 0)} UNet steps)", flush=True)


def _cuda(cfg: TrainConfig) -> bool:
    return cfg.device.startswith("cuda")


def _device_type(cfg: TrainConfig) -> str:
    return "cuda" if _cuda(cfg) else "cpu"


def train(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if cfg.init:
        model = load_converted(Path(cfg.init), torch.float32, cfg.device)
    else:
        model = build_model(cfg, build_tokenizer(out / "tokenizer"))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    started = time.time()
    scale = train_vae(model, cfg, generator) if cfg.vae_minutes > 0 else model.config.vae.scaling_factor
    model.vae.eval().requires_grad_(False)
    print(f"vae done: latent scale {scale:.4f}", flush=True)
    info = lambda steps: {"train_config": dataclasses.asdict(cfg), "unet_steps": steps,  # noqa: E731
                          "minutes": round((time.time() - started) / 60, 2), "latent_scale": scale,
                          "device": torch.cuda.get_device_name() if _cuda(cfg) else "cpu",
                          "torch": torch.__version__}
    save = lambda ema, steps: save_model(model, ema, scale, out / "model", info(steps))  # noqa: E731
    result = train_unet(model, cfg, scale, generator, save)
    save(result["ema"], result["steps"])
    return out / "model"


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "1"):
        return True
    if text.lower() in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "out":
            parser.add_argument(flag, required=True)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, type=_yes_no, default=field.default, metavar="{yes,no}")
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    print(f"model folder: {train(cfg)}")


if __name__ == "__main__":
    main()
