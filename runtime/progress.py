"""A rich progress display for `generate`: clips, steps of the current clip, seconds per clip."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .generate import GenerateRequest, generate


def run_with_progress(request: GenerateRequest) -> dict:
    """`generate` with a live bar on stderr (plain lines when stderr is not a terminal)."""
    console = Console(stderr=True)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[note]}")]
    with Progress(*columns, console=console, disable=not sys.stderr.isatty()) as bar:
        clips = bar.add_task("clips", total=request.sampler.clips, note="")
        steps = bar.add_task("steps", total=request.sampler.steps, note="")

        def on_step(info: dict) -> None:
            bar.update(steps, completed=info["step"] + 1)

        def on_clip(clip) -> None:
            bar.update(clips, completed=clip.index + 1, note=f"{clip.seconds:.2f} s/clip")
            bar.reset(steps)
            if not sys.stderr.isatty():
                console.print(f"clip {clip.index + 1}/{request.sampler.clips}: {len(clip.frames)} frames, "
                              f"{clip.seconds:.2f} s")

        return generate(request, on_clip=on_clip, on_step=on_step)
