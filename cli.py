"""`vidrd-rt`: a thin command line over the library; each command maps onto one library function."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="VidRD inference runtime: long text-to-video with a temporal Stable Diffusion UNet.")

# Model flags shared by every command that needs a model.
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="tiny, shapes, vidrd-base, or a model folder; none: the small default model (synthetic scenes)")]
RandomOpt = Annotated[bool, typer.Option("--random-weights", help="draw random weights for a preset")]
WeightsSeedOpt = Annotated[int, typer.Option("--weights-seed", help="seed of --random-weights")]
CkptOpt = Annotated[Optional[str], typer.Option("--ckpt", help="the authors' ModelT2V.pth")]
SdOpt = Annotated[Optional[str], typer.Option("--sd", help="stable-diffusion-2-1-base folder (diffusers layout)")]
VaeOpt = Annotated[Optional[str], typer.Option("--vae", help="the authors' vae_finetuned folder")]


def _source(model, random_weights, weights_seed, ckpt, sd, vae):
    from .runtime.weights import ModelSource

    return ModelSource(model=model, ckpt=ckpt, sd_dir=sd, vae_dir=vae, random_weights=random_weights,
                       weights_seed=weights_seed)


def _fail(message: str) -> None:
    """Bad input: main() prints it as one line and exits 2 (typer.Exit would be swallowed outside standalone mode)."""
    from .runtime.errors import UserError

    raise UserError(message)


@app.command()
def inspect(
    preset: Annotated[Optional[str], typer.Argument(help="tiny or vidrd-base")] = None,
    model: ModelOpt = None, ckpt: CkptOpt = None, sd: SdOpt = None, vae: VaeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="every tensor as [name, shape, dtype], authors' names")] = False,
):
    """Parameter counts per network (total and temporal); with --json, the full state-dict layout."""
    from .runtime.inspect import inspect_model

    report = inspect_model(_source(model or preset, True, 0, ckpt, sd, vae), layout=as_json)
    if as_json:
        typer.echo(json.dumps(report["layout"]))
        return
    for network, counts in report["counts"].items():
        typer.echo(f"{network:13s} {counts['total']:>15,d} parameters, {counts['temporal']:>13,d} temporal")
    typer.echo(f"{'all':13s} {sum(c['total'] for c in report['counts'].values()):>15,d} parameters")


@app.command()
def convert(
    out: Annotated[str, typer.Argument(help="new folder for the converted model")],
    model: ModelOpt = None, random_weights: RandomOpt = False, weights_seed: WeightsSeedOpt = 0,
    ckpt: CkptOpt = None, sd: SdOpt = None, vae: VaeOpt = None,
):
    """Write a model (usually the authors' release) as one folder: vidrd.json + safetensors + tokenizer."""
    from pathlib import Path

    from .runtime.weights import load_model, save_converted

    loaded = load_model(_source(model, random_weights, weights_seed, ckpt, sd, vae))
    save_converted(loaded, Path(out))
    typer.echo(f"wrote {out}")


@app.command()
def generate(
    out: Annotated[str, typer.Option("--out", help="video.mp4, video.gif, frames.npy or a folder/ of PNGs")],
    prompt: Annotated[str, typer.Option("--prompt", help="what the video shows")] = "a red circle moving right",
    clips: Annotated[int, typer.Option(help="number of clips")] = 1,
    frames: Annotated[int, typer.Option(help="frames per clip (N)")] = 16,
    overlap: Annotated[int, typer.Option(help="frames prompted by the previous clip (M)")] = 4,
    alpha: Annotated[float, typer.Option(help="PNS strength (Eq. 7)")] = 4.0,
    beta: Annotated[float, typer.Option(help="DSG strength (Eq. 8), in [0, 1]")] = 0.4,
    held_frames: Annotated[str, typer.Option(
        help="what the UNet sees of the frames DSG holds: noisy (the paper), clean (models trained for it), or "
             "auto: clean for such a model on the torch backend at --inflight 1 (the default model), else noisy")]
    = "auto",
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 10.0,
    negative_prompt: Annotated[str, typer.Option(help="what to steer away from")] = "",
    seed: Annotated[int, typer.Option(help="noise seed: same seed and inputs, same video")] = 0,
    noise_prior: Annotated[float, typer.Option(help="progressive noise prior for clip 0 (0: off)")] = 0.0,
    height: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    width: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    decoder: Annotated[str, typer.Option(help="temporal (paper) or per-frame (authors' code)")] = "temporal",
    drop_overlap: Annotated[bool, typer.Option("--drop-overlap", help="leave out each later clip's first M frames")] = False,
    fps: Annotated[int, typer.Option(help="frames per second of the video file")] = 8,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run of the same command")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16")] = "fp32",
    backend: Annotated[str, typer.Option(help="torch, compiled, onnxruntime or tensorrt")] = "torch",
    engine_dir: Annotated[Optional[str], typer.Option(help="engines from build-engine (onnxruntime/tensorrt)")] = None,
    inflight: Annotated[Optional[int], typer.Option(
        help="clips denoised together in one batched UNet call; default 4 on CUDA (torch/compiled), else 1")] = None,
    model: ModelOpt = None, random_weights: RandomOpt = False, weights_seed: WeightsSeedOpt = 0,
    ckpt: CkptOpt = None, sd: SdOpt = None, vae: VaeOpt = None,
):
    """Turn text into a video of any length, clip by clip, written while it is made."""
    from .runtime.config import HELD_FRAMES, RuntimeConfig, SamplerConfig
    from .runtime.generate import GenerateRequest
    from .runtime.progress import run_with_progress

    source = _source(model, random_weights, weights_seed, ckpt, sd, vae)
    if held_frames != "auto" and held_frames not in HELD_FRAMES:
        _fail(f"--held-frames must be auto, {', '.join(HELD_FRAMES[:-1])} or {HELD_FRAMES[-1]} (got {held_frames!r})")
    if held_frames == "auto":
        held_frames = auto_held_frames(source, backend, inflight, overlap)
    request = GenerateRequest(
        prompt=prompt, out=out, negative_prompt=negative_prompt, height=height, width=width,
        drop_overlap=drop_overlap, fps=fps, resume=resume,
        sampler=SamplerConfig(clips=clips, frames=frames, overlap=overlap, alpha=alpha, beta=beta, steps=steps,
                              guidance=guidance, seed=seed, noise_prior=noise_prior, held_frames=held_frames),
        runtime=RuntimeConfig(device=device, dtype=dtype, backend=backend, decoder=decoder,
                              inflight=inflight or default_inflight(device, backend, clips, held_frames),
                              engine_dir=engine_dir),
        source=source,
    )
    summary = run_with_progress(request)
    typer.echo(f"wrote {summary['out']}: {summary['clips']} clips, {summary['frames']} frames, "
               f"{summary['width']}x{summary['height']}")


@app.command("eval")
def eval_(
    json_path: Annotated[str, typer.Option("--json", help="result file; the markdown table goes beside it (.md)")],
    rows: Annotated[str, typer.Option(help="all (22 ablation rows), quick (5), or row names joined by commas")]
    = "all",
    prompts: Annotated[str, typer.Option(help="all (24: every colour x direction) or quick (6)")] = "all",
    clips: Annotated[int, typer.Option(help="clips per video (>= 3 gives two boundaries)")] = 3,
    frames: Annotated[int, typer.Option(help="frames per clip (N)")] = 16,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 10.0,
    seed: Annotated[int, typer.Option(help="prompt i uses seed + i in every row")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16")] = "fp32",
    world: Annotated[str, typer.Option(help="auto (the model's training world), plain (a frame with edges) or "
                                            "torus (shapes wrap around; positions measured around it)")] = "auto",
    model: ModelOpt = None, random_weights: RandomOpt = False, weights_seed: WeightsSeedOpt = 0,
):
    """Colour and direction accuracy and clip-boundary smoothness over a fixed prompt set (synthetic-scene models)."""
    from pathlib import Path

    from .bench.eval_shapes import WORLDS, ablation_configs, configs_by_name, eval_prompts, run_eval

    if prompts not in ("all", "quick"):
        _fail(f"--prompts must be all or quick (got {prompts!r})")
    if world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)} (got {world!r})")
    configs = ablation_configs(quick=rows == "quick") if rows in ("all", "quick") else configs_by_name(rows.split(","))
    run_eval(_source(model, random_weights, weights_seed, None, None, None), configs,
             eval_prompts(quick=prompts == "quick"), clips=clips, seed=seed, device=device, dtype=dtype,
             out_json=json_path, out_md=str(Path(json_path).with_suffix(".md")), frames=frames, steps=steps,
             guidance=guidance, world=world, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {json_path}")


@app.command("build-engine")
def build_engine(
    engine_dir: Annotated[str, typer.Option("--engine-dir", help="folder for the engines and their manifest")],
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt")] = "onnxruntime",
    frames: Annotated[int, typer.Option(help="frames per clip (N) the engines run")] = 16,
    height: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    width: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    batch: Annotated[int, typer.Option(help="clips per UNet call (the UNet runs twice that, for CFG)")] = 1,
    precision: Annotated[Optional[str], typer.Option(help="fp16 or fp32; default fp16 on cuda, fp32 on cpu")] = None,
    min_frames: Annotated[Optional[int], typer.Option(help="dynamic frame axis from this many frames")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="dynamic frame axis up to this many frames")] = None,
    decoder: Annotated[str, typer.Option(help="temporal (paper) or per-frame (authors' code)")] = "temporal",
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda; default cuda when there is one")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="rebuild stale or damaged engines")] = False,
    model: ModelOpt = None, random_weights: RandomOpt = False, weights_seed: WeightsSeedOpt = 0,
    ckpt: CkptOpt = None, sd: SdOpt = None, vae: VaeOpt = None,
):
    """Export the UNet, decoder and text encoder to ONNX (and TensorRT plans) for --backend onnxruntime|tensorrt."""
    from .export.build import build_from_source, default_device, default_precision
    from .export.specs import EngineShapes

    device = device or default_device()
    shapes = EngineShapes(frames=frames, height=height, width=width, batch=batch, decoder=decoder,
                          precision=precision or default_precision(device), min_frames=min_frames,
                          max_frames=max_frames)
    summary = build_from_source(_source(model, random_weights, weights_seed, ckpt, sd, vae), backend, engine_dir,
                                shapes, device, rebuild, log=typer.echo)
    built = ", ".join(f"{n} ({summary['seconds'][n]:.1f} s)" for n in summary["built"]) or "nothing"
    typer.echo(f"{summary['engine_dir']}: built {built}; reused {', '.join(summary['reused']) or 'nothing'}")


@app.command()
def bench(
    ladder: Annotated[str, typer.Option(help="rows: preset[:key=value...] joined by commas (see bench/README.md)")]
    = "authors,fp16,compiled,wavefront,onnxruntime,tensorrt",
    backends: Annotated[Optional[str], typer.Option(help="keep only rows of these backends, e.g. torch,compiled")]
    = None,
    k: Annotated[str, typer.Option("--k", help="K values of the `wavefront` row (clips in flight)")] = "2,4,8",
    json_path: Annotated[str, typer.Option("--json", help="result file; .md, .png and .log go beside it")]
    = "bench.json",
    append: Annotated[bool, typer.Option("--append", help="keep the rows already in --json (same name: replaced)")]
    = False,
    merge: Annotated[Optional[list[str]], typer.Option("--merge", help="merge these result files; runs nothing")]
    = None,
    clips: Annotated[int, typer.Option(help="clips of the clean pass (steady state: >= 10)")] = 10,
    warmup_clips: Annotated[Optional[int], typer.Option(help="warm-up clips; default max(2, K+1)")] = None,
    stage_clips: Annotated[Optional[int], typer.Option(help="instrumented clips; default max(2, K+1)")] = None,
    time_budget: Annotated[float, typer.Option(help="seconds; later rows skipped, clean pass cut (0: none)")] = 0.0,
    encode: Annotated[bool, typer.Option("--encode", help="clean pass also encodes the mp4 (end to end)")] = False,
    peak_size: Annotated[Optional[int], typer.Option(help="matmul side for the peak (8192 cuda, 512 cpu)")] = None,
    prompt: Annotated[str, typer.Option(help="the one prompt")] = "a boat is sailing in a lake",
    frames: Annotated[int, typer.Option(help="frames per clip (N)")] = 16,
    overlap: Annotated[int, typer.Option(help="M")] = 4,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[float, typer.Option(help="CFG scale")] = 10.0,
    height: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    width: Annotated[Optional[int], typer.Option(help="pixels; default: the model's")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="dtype of rows that do not name one")] = "fp16",
    decoder: Annotated[str, typer.Option(help="decoder of rows that do not name one")] = "temporal",
    engine_dir: Annotated[Optional[str], typer.Option(help="engines for onnxruntime/tensorrt rows")] = None,
    model: ModelOpt = None, random_weights: RandomOpt = False, weights_seed: WeightsSeedOpt = 0,
    ckpt: CkptOpt = None, sd: SdOpt = None, vae: VaeOpt = None,
):
    """Time an ablation ladder of runtime configurations side by side: JSON, markdown table and PNG plot."""
    import shlex

    from .bench.ladder import parse_ints, parse_ladder
    from .bench.report import markdown
    from .bench.runner import BenchRequest, merge_files, run_bench
    from .runtime.config import SamplerConfig

    if merge:
        typer.echo(markdown(merge_files(merge, json_path, append)), nl=False)
        return
    rows = parse_ladder(ladder, device, dtype, decoder, parse_ints(k, "--k"), engine_dir,
                        tuple(b.strip() for b in backends.split(",")) if backends else None)
    request = BenchRequest(
        source=_source(model, random_weights, weights_seed, ckpt, sd, vae), rows=tuple(rows), device=device,
        sampler=SamplerConfig(clips=clips, frames=frames, overlap=overlap, steps=steps, guidance=guidance),
        prompt=prompt, height=height, width=width, warmup_clips=warmup_clips, stage_clips=stage_clips,
        encode_in_loop=encode, json_path=json_path, append=append, time_budget_s=time_budget, peak_size=peak_size,
        command=shlex.join(["vidrd-rt", *sys.argv[1:]]),
    )
    typer.echo(markdown(run_bench(request)), nl=False)


def auto_held_frames(source, backend: str, inflight: Optional[int], overlap: int) -> str:
    """--held-frames auto: clean held frames where they can run (torch backend, one clip at a time) on a model
    trained for them with this M (measured on the default model: seams 8x the within-clip step with noisy, 1.3x
    with clean; README), else the paper's noisy ones, with a note when the model could have had clean ones."""
    from .runtime.weights import clean_held_overlap

    trained = clean_held_overlap(source)
    if not trained:
        return "noisy"
    if backend == "torch" and inflight in (None, 1) and overlap == trained:
        return "clean"
    typer.echo(f"note: this model was trained for --held-frames clean (torch backend, --inflight 1, --overlap "
               f"{trained}); these settings use the paper's noisy held frames, whose seams jump more", err=True)
    return "noisy"


def default_inflight(device: str, backend: str, clips: int, held_frames: str = "noisy") -> int:
    """Measured on an H200 (bench/RESULTS.md): 4 clips per UNet call give 1.19x the frames/s of 1 (first clip 4.6 s
    instead of 1.24 s); 8 give 1.11x more again but an 8.1 s first clip, so 4 is the default. Engines have a fixed
    batch, and on a CPU batching gains nothing: 1 there. Clean held frames need the previous clip finished: 1."""
    on_gpu = device.startswith("cuda") and backend in ("torch", "compiled")
    return 4 if on_gpu and clips >= 4 and held_frames == "noisy" else 1


def main() -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    from .runtime.errors import Interrupted, UserError

    try:
        app(standalone_mode=False)
    except UserError as e:
        _fail_plain(str(e))
    except Interrupted as e:
        print(f"interrupted by {e}: the clips finished so far are in the output; continue with --resume",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.BadParameter, typer.Abort) as e:
        _fail_plain(str(e))
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise


def _fail_plain(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
