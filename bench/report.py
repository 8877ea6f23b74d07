"""Bench results as data: the JSON document, merging several runs, ratios, a markdown table and a PNG plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..runtime.errors import UserError

SCHEMA = "vidrd-rt-bench/1"

# Every row carries every key (None where a number does not apply or was not measured). Times are seconds (_s)
# or milliseconds (_ms), memory MiB, power W. bench/README.md repeats this table.
ROW_FIELDS: dict[str, str] = {
    "name": "row name, unique in a result file (merging replaces a row of the same name)",
    "backend": "RuntimeConfig.backend: torch (eager), compiled, onnxruntime, tensorrt",
    "dtype": "RuntimeConfig.dtype: fp32, fp16, bf16",
    "decoder": "RuntimeConfig.decoder: temporal (paper) or per-frame (authors' code)",
    "inflight": "RuntimeConfig.inflight: K, clips in flight in the wavefront",
    "engine_dir": "RuntimeConfig.engine_dir (onnxruntime / tensorrt)",
    "status": "ok; skipped (not built: an import or engine build failed, or not started); failed (broke running)",
    "reason": "why skipped or failed: the exception's type and first line",
    "run": "id (start time, UTC) of the invocation that measured the row; its details are under runs",
    "command": "the command line of that invocation",
    "load_s": "loading the weights (random draw for a preset) onto the device in the row's dtype",
    "build_s": "building the backends and the pipeline (engine loading; torch.compile itself is lazy)",
    "warmup_clips": "clips of the warm-up pass (default max(2, K+1): clip 0, a DSG clip, every wavefront batch)",
    "warmup_s": "the whole warm-up pass",
    "warmup_first_clip_s": "the first clip ever of this configuration, compilation included",
    "compile_s": "compile and CUDA-graph capture: the backend's own count if it keeps one, else compile_estimate_s",
    "backend_compile_s": "the compiled backend's own count (CompiledDenoiser.compile_seconds)",
    "compile_estimate_s": "warm-up time minus what the same clips take warm (first_clip_s + (warmup_clips-1) clip_s)",
    "compile_in_clean_s": "compilation that happened inside the clean pass (should be 0: else raise --warmup-clips)",
    "stage_clips": "clips of the instrumented pass (default max(2, K+1))",
    "text_encoder_ms": "tokenizing and encoding the prompt pair [negative, prompt], synced, median of 5",
    "unet_call_ms": "one denoiser call at the largest batch seen, device synced around it, median; blank when the "
                    "backend compiles the whole step (the UNet is then not a separate call)",
    "unet_calls": "denoiser calls in the instrumented pass (0: the backend compiled the whole step)",
    "unet_batch_clips": "clips per denoiser call (its batch is 2 x clips: CFG)",
    "unet_ms_per_clip_step": "unet_call_ms / unet_batch_clips",
    "step_ms": "one sampler step of all clips in flight: DSG overwrite, CFG batching, UNet, guidance, DDIM update "
               "(time between consecutive step callbacks of one clip, synced), median",
    "scheduler_ms": "step_ms minus the UNet call inside the same step, median: the sampler's own overhead",
    "decode_ms": "one decoder call (a clip of N frames, VAE decoder), synced, median",
    "encode_ms": "encoding one clip's frames to H.264 mp4 with runtime/video_io (CPU), mean per clip incl. flush",
    "clips": "clips timed in the clean pass",
    "clean_truncated": "true when --time-budget cut the clean pass short",
    "first_clip_s": "clean pass: from the start of a new video to clip 0's frames on the host (warm, no compile)",
    "clip_s": "clean pass: steady seconds per clip, (t_last - t_0) / (clips - 1) between clip arrivals",
    "clip_step_ms": "clip_s / steps: what one step of one clip costs in steady state (wavefront included)",
    "fps_steady": "clean pass: frames of clips 1.. over the time from clip 0's arrival to the last (all N frames "
                  "of each clip, as generate writes them)",
    "fps_total": "clean pass: all frames over the whole pass, first clip included",
    "fps_end_to_end": "with --encode: all frames over the time until the mp4 is finished (writer thread)",
    "fps_vs_fp16_eager": "fps_steady / fps_steady of the fp16 eager row (torch, fp16, K=1) of the same document",
    "fps_vs_authors": "fps_steady / fps_steady of the authors' row (torch, fp32, per-frame, K=1)",
    "fp16_eager_ref": "name of the row used as fp16 eager reference",
    "authors_ref": "name of the row used as authors' reference",
    "refs_same_run": "true when both references come from this row's own invocation",
    "peak_torch_mib": "torch.cuda.max_memory_allocated over the whole row (weights, compile, all passes)",
    "clean_peak_2clips_mib": "the same, reset at the clean pass's start, read after 2 clips",
    "clean_peak_mib": "the same at the clean pass's end",
    "mem_growth_pct": "clean_peak_mib / clean_peak_2clips_mib - 1, in %: memory growth from 2 clips to all",
    "rss_2clips_mib": "host resident memory after 2 clips of the clean pass",
    "rss_mib": "host resident memory at the clean pass's end",
    "nvml_used_max_mib": "NVML device memory used (all processes, CUDA context, caching allocator), max over the row",
    "power_mean_w": "NVML board power, mean over the steady part of the clean pass (sampled every 50 ms)",
    "power_max_w": "the same, max",
    "util_mean_pct": "NVML GPU utilisation (share of time a kernel ran), mean over the steady part",
    "util_max_pct": "the same, max",
    "nvml_samples": "NVML samples in that window",
    "joules_per_frame": "NVML energy counter over the steady part / its frames",
    "flops_per_clip_step": "model FLOPs of one UNet evaluation of one clip with CFG (batch 2), counted on meta",
    "achieved_tflops": "flops_per_clip_step x clip-steps per second (steps / clip_s) / 1e12",
    "peak_tflops": "matmul peak of the row's dtype measured in the same invocation",
    "mfu": "achieved_tflops / peak_tflops",
}

# (key, header, format) per table.
MAIN_COLUMNS = [
    ("name", "config", "s"), ("backend", "backend", "s"), ("dtype", "dtype", "s"), ("decoder", "decoder", "s"),
    ("inflight", "K", "d"), ("clips", "clips", "d"), ("fps_steady", "frames/s", ".2f"),
    ("fps_vs_fp16_eager", "x fp16 eager", ".2f"), ("fps_vs_authors", "x authors", ".2f"),
    ("first_clip_s", "first clip s", ".2f"), ("compile_s", "compile s", ".1f"), ("clip_step_ms", "ms/clip-step", ".1f"),
    ("peak_torch_mib", "peak MiB", ".0f"), ("mem_growth_pct", "mem growth %", ".2f"),
    ("achieved_tflops", "TFLOP/s", ".3g"), ("mfu", "MFU", ".3g"),
]
STAGE_COLUMNS = [
    ("name", "config", "s"), ("text_encoder_ms", "text ms", ".1f"), ("unet_call_ms", "UNet call ms", ".1f"),
    ("unet_batch_clips", "clips/call", ".0f"), ("step_ms", "step ms", ".1f"), ("scheduler_ms", "sched ms", ".1f"),
    ("decode_ms", "decode ms", ".1f"), ("encode_ms", "encode ms", ".1f"), ("nvml_used_max_mib", "NVML MiB", ".0f"),
    ("power_mean_w", "W mean", ".0f"), ("power_max_w", "W max", ".0f"), ("util_mean_pct", "util %", ".0f"),
    ("joules_per_frame", "J/frame", ".2f"), ("load_s", "load s", ".1f"), ("build_s", "build s", ".1f"),
]


def document(setting: dict, runs: list[dict], rows: list[dict]) -> dict:
    """The result document; every row gets every ROW_FIELDS key, in that order (extra keys kept after them)."""
    rows = [{**{key: row.get(key) for key in ROW_FIELDS}, **row} for row in rows]
    doc = {"schema": SCHEMA, "setting": setting, "runs": runs, "rows": rows}
    add_ratios(doc["rows"])
    return doc


def load(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable bench result ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path}: not a {SCHEMA} result file")
    return doc


def check_same_setting(a: dict, b: dict, where: str) -> None:
    """Raise UserError when two settings disagree on a key both set."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise UserError(f"cannot merge {where}: setting {key!r} differs ({a[key]!r} vs {b[key]!r})")


def merge(docs: list[dict]) -> dict:
    """One document from several; rows keyed by name (a later row of the same name replaces an earlier one,
    in its place), runs keyed by id. The settings must agree (None matches anything)."""
    setting: dict = {}
    runs: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    for i, doc in enumerate(docs):
        check_same_setting(setting, doc["setting"], f"result {i + 1}")
        setting.update({k: v for k, v in doc["setting"].items() if v is not None or k not in setting})
        runs.update({run["id"]: run for run in doc["runs"]})
        rows.update({row["name"]: row for row in doc["rows"]})
    used = {row.get("run") for row in rows.values()}
    return document(setting, [r for r in runs.values() if r["id"] in used], list(rows.values()))


def _pick(rows: list[dict], **want) -> Optional[dict]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("fps_steady")]
    return next((r for r in ok if all(r.get(k) == v for k, v in want.items())), None)


def add_ratios(rows: list[dict]) -> None:
    """fps ratios against fp16 eager (torch fp16, K=1; temporal decoder preferred) and the authors' configuration
    (torch fp32 per-frame, K=1), both taken from the same document."""
    fp16 = _pick(rows, backend="torch", dtype="fp16", inflight=1, decoder="temporal") or \
        _pick(rows, backend="torch", dtype="fp16", inflight=1)
    authors = _pick(rows, backend="torch", dtype="fp32", inflight=1, decoder="per-frame")
    for row in rows:
        for key, ref in (("fps_vs_fp16_eager", fp16), ("fps_vs_authors", authors)):
            fps = row.get("fps_steady")
            row[key] = fps / ref["fps_steady"] if fps and ref else None
        row["fp16_eager_ref"], row["authors_ref"] = (fp16 or {}).get("name"), (authors or {}).get("name")
        # Whether both references were timed in the same invocation as this row (else: merged from another).
        row["refs_same_run"] = all(ref is None or ref.get("run") == row.get("run") for ref in (fp16, authors))


##### markdown


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "s":
        return str(value)
    if fmt == "d":
        return str(int(value))
    return format(value, fmt)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return lines


def markdown(doc: dict) -> str:
    s = doc["setting"]
    ok = [r for r in doc["rows"] if r.get("status") == "ok"]
    other = [r for r in doc["rows"] if r.get("status") != "ok"]
    head = (f"{s.get('model')} on {s.get('device_name')}: {s.get('width')}x{s.get('height')}, {s.get('frames')} frames "
            f"per clip (M={s.get('overlap')}), {s.get('steps')} steps, CFG {s.get('guidance')}, "
            f"prompt {s.get('prompt')!r}")
    lines = ["# vidrd-rt bench", "", head, "", *_table(ok, MAIN_COLUMNS), "", "Stages (medians, instrumented pass):",
             "", *_table(ok, STAGE_COLUMNS)]
    for run in doc["runs"]:
        peaks = ", ".join(f"{k} {v:.1f}" for k, v in run.get("matmul_peak_tflops", {}).items()) or "-"
        flops = run.get("flops_per_clip_step")
        flops_text = f"{flops / 1e12:.4g} TFLOP" if flops else "-"
        floor = run.get("floor_fps")
        lines += ["", f"Run {run['id']}: matmul peak TFLOP/s {peaks}; UNet FLOPs per clip-step {flops_text}; "
                      f"compute floor {_cell(floor, '.1f')} frames/s; {run['environment'].get('gpu', 'cpu')}, "
                      f"torch {run['environment'].get('torch')}",
                  "", f"`{run.get('command', '')}`"]
    if other:
        lines += ["", "Not measured:", ""] + [f"- {r['name']}: {r['status']}: {r.get('reason')}" for r in other]
    return "\n".join(lines) + "\n"


##### files


def write_all(doc: dict, json_path: Path) -> None:
    """JSON at json_path; .md and .png beside it (same stem). Each file is replaced atomically."""
    json_path = Path(json_path)
    atomic_write_bytes(str(json_path), (json.dumps(doc, indent=1, default=_jsonable) + "\n").encode())
    atomic_write_bytes(str(json_path.with_suffix(".md")), markdown(doc).encode())
    atomic_write_bytes(str(json_path.with_suffix(".png")), plot_png(doc))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a part (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".partial", dir=Path(path).parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _series(doc: dict) -> tuple[list[str], list[float], dict[str, list[float]]]:
    ok = [r for r in doc["rows"] if r.get("status") == "ok"]
    names = [r["name"] for r in ok]
    fps = [r.get("fps_steady") or 0.0 for r in ok]
    latency = {label: [r.get(key) or 0.0 for r in ok] for key, label in
               (("unet_call_ms", "UNet call"), ("step_ms", "step (instrumented)"),
                ("clip_step_ms", "per clip-step (clean)"))}
    return names, fps, latency


def plot_png(doc: dict) -> bytes:
    """Frames/s and per-step latency per configuration, as PNG bytes (matplotlib Agg; Pillow when it is absent)."""
    try:
        import matplotlib
    except ImportError:
        return _plot_pillow(*_series(doc))
    matplotlib.use("Agg")
    return _plot_matplotlib(*_series(doc), title=_title(doc))


def _title(doc: dict) -> str:
    s = doc["setting"]
    return f"{s.get('model')} {s.get('width')}x{s.get('height')}, {s.get('frames')} frames, {s.get('steps')} steps"


def _plot_matplotlib(names, fps, latency, title: str) -> bytes:
    import io

    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    x = range(len(names))
    a.bar(x, fps, color="tab:blue")
    a.set_ylabel("frames/s (steady state)")
    width = 0.8 / len(latency)
    for i, (label, values) in enumerate(latency.items()):
        b.bar([j + (i - 1) * width for j in x], values, width, label=label)
    b.set_ylabel("ms")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_pillow(names, fps, latency) -> bytes:
    """A plain two-panel bar chart without matplotlib (it is not a vidrd-rt dependency)."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1000, 400), "white")
    draw = ImageDraw.Draw(image)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for panel, (label, series) in enumerate([("frames/s", {"fps": fps}), ("ms per step", latency)]):
        left, top, w, h = 40 + panel * 500, 30, 440, 290
        draw.text((left, 8), label, fill="black")
        draw.line([(left, top + h), (left + w, top + h)], fill="black")
        top_value = max([v for values in series.values() for v in values] + [1e-9])
        slot = w / max(len(names), 1)
        for j, name in enumerate(names):
            draw.text((left + j * slot + 2, top + h + 6), name[:14], fill="black")
            for i, values in enumerate(series.values()):
                bar = slot * 0.8 / len(series)
                x0 = left + j * slot + i * bar
                draw.rectangle([x0, top + h - h * values[j] / top_value, x0 + bar - 1, top + h],
                               fill=colours[i % len(colours)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

