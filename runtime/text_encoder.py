"""CLIP text encoder (transformers) and tokenizer, wrapped so the forward is tensors in, one tensor out."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import TextEncoderConfig

log = logging.getLogger(__name__)

# A character-level CLIP BPE vocabulary shipped with the package, for models built here (tiny, random weights).
BUNDLED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"


class TextEncoder(nn.Module):
    """token ids (B, 77) -> last hidden states (B, 77, D), as Stable Diffusion 2.1 conditions its UNet."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel

        self.config = cfg
        self.model = CLIPTextModel(cfg.to_transformers())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


class PromptTooLongWarning(UserWarning):
    pass


def load_tokenizer(folder: Path | None = None):
    """CLIPTokenizer from a local folder (vocab.json + merges.txt); the bundled one when none is given."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder or BUNDLED_TOKENIZER), local_files_only=True)


def tokenize(tokenizer, prompts: list[str], max_length: int = 77) -> torch.Tensor:
    """Prompts -> ids (B, max_length), padded and truncated as Stable Diffusion does; warns when truncating."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    for prompt in prompts:
        full = tokenizer(prompt, verbose=False).input_ids
        if len(full) > max_length:
            dropped = tokenizer.decode(full[max_length - 1 : -1])
            log.warning("prompt longer than %d tokens (CLIP's limit) was truncated; dropped: %r", max_length, dropped)
    return ids.input_ids
