"""UNet step on the GPU: torch eager fp16 vs ONNX Runtime CUDA fp16 (I/O binding), vidrd-base, in one run.

Random weights, 256x256 (32x32 latents), 16 frames, CFG batch 2. In order, each stage logged with a timestamp and
the JSON rewritten after it, so a run cut short still says where time went:
  1. load vidrd-base in fp16 on the GPU, export the UNet to ONNX there (timed; .onnx + .data size);
  2. an ORT CUDA session through the backend's own OrtNetwork (I/O binding on torch buffers, its own stream);
  3. parity on fresh random inputs against a float64 reference of the same (fp16-rounded) weights on the GPU:
     ||out - ref|| / ||ref|| for torch fp16 and ORT fp16, NaN check, ORT's output poisoned before each run;
  4. step latency: median of CUDA-event timings, inputs rotated over 3 sets, torch and ORT interleaved twice;
  5. if time is left (--budget): the same for the TensorRT-form ONNX (attention as MatMul/Softmax/MatMul) under ORT.
The table is printed after step 4 and again last; full results go to $OUT/ort_vs_torch.json.

    PYTHONUNBUFFERED=1 python3 bench/ort_vs_torch.py          (needs onnxruntime-gpu and diffusers importable)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a file: bench/ (generic module names: report, metrics...) leaves sys.path
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

T0 = time.time()
TOLERANCE = 1e-2  # METHOD.md: reduced-precision (16-bit) operands land between 1e-3 and 1e-2; NaN never passes


def log(message: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {message}", flush=True)


def make_importable() -> None:
    """On a bare checkout the repository root is the package `vidrd_rt`: link it under a temp folder."""
    try:
        import vidrd_rt  # noqa: F401
    except ImportError:
        shim = Path("/tmp/vidrd_rt_shim")
        shim.mkdir(exist_ok=True)
        if not (shim / "vidrd_rt").exists():
            (shim / "vidrd_rt").symlink_to(Path(__file__).resolve().parents[1])
        sys.path.insert(0, str(shim))


class Results(dict):
    """Everything measured; written to $OUT after every stage."""

    def save(self) -> None:
        out = Path(os.environ.get("OUT", "."))
        out.mkdir(parents=True, exist_ok=True)
        (out / "ort_vs_torch.json").write_text(json.dumps(self, indent=1, default=str))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def fresh_inputs(spec, seed: int, device):
    """The sampler's view: float32 latents and context, int64 timesteps in [0, 1000)."""
    g = torch.Generator().manual_seed(seed)
    sample, t, context = (s.shape for s in spec.inputs)
    return (torch.randn(sample, generator=g).to(device), torch.randint(0, 1000, t, generator=g).to(device),
            torch.randn(context, generator=g).to(device))


def time_ms(fn, input_sets, warmup: int, iters: int) -> dict:
    """Median and spread of CUDA-event timings of fn(*inputs) (host clock on a CPU), rotating over input_sets."""
    cuda = input_sets[0][0].is_cuda
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    times = []
    for i in range(iters):
        if not cuda:
            start = time.perf_counter()
            fn(*input_sets[i % len(input_sets)])
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*input_sets[i % len(input_sets)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "n": iters}


def unet_flops(unet, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(*inputs)
    return float(counter.get_total_flops())


def export_variant(model, spec, folder: Path, attention: str, results: Results) -> Path:
    from vidrd_rt.export.onnx import data_file, export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    path = export_onnx(model.unet, spec, folder / "unet.onnx", attention=attention)
    size = path.stat().st_size + data_file(path).stat().st_size
    results[f"export_{attention}"] = {"seconds": round(time.perf_counter() - start, 1), "bytes": size}
    log(f"exported UNet ({attention} attention): {results[f'export_{attention}']['seconds']} s, {size / 1e9:.2f} GB")
    results.save()
    return path


def check_cost(model, path: Path, results: Results) -> None:
    """What `generate --backend onnxruntime` spends before it starts: hash the UNet's weights and its files."""
    from vidrd_rt.export.manifest import file_sha256, weights_hash
    from vidrd_rt.export.onnx import data_file

    start = time.perf_counter()
    weights_hash(model.unet)
    middle = time.perf_counter()
    file_sha256(path), file_sha256(data_file(path))
    results["check_s"] = {"weights_hash": round(middle - start, 2),
                          "files_sha256": round(time.perf_counter() - middle, 2)}
    log(f"engine check cost: {results['check_s']}")
    results.save()


def ort_denoiser(path: Path, spec, results: Results, key: str, device: torch.device):
    """The backend's denoiser (EngineDenoiser over OrtNetwork) on this file; session start and first call (cuDNN algorithm search) timed."""
    from vidrd_rt.runtime.backend_ort import OrtNetwork
    from vidrd_rt.runtime.backends import EngineDenoiser

    cuda = device.type == "cuda"
    free0 = torch.cuda.mem_get_info()[0] if cuda else 0
    start = time.perf_counter()
    network = OrtNetwork(path, spec, device)
    created = time.perf_counter() - start
    denoise = EngineDenoiser(network)
    start = time.perf_counter()
    denoise(*fresh_inputs(spec, 99, device))
    if cuda:
        torch.cuda.synchronize()
    results[key] = {"session_s": round(created, 1), "first_call_s": round(time.perf_counter() - start, 1),
                    "providers": network.session.get_providers(),
                    "device_bytes": free0 - torch.cuda.mem_get_info()[0] if cuda else 0}
    log(f"{key}: session {created:.1f} s, first call {results[key]['first_call_s']} s")
    results.save()
    return denoise, network


def parity(denoisers: dict, network_outputs: dict, reference, spec, results: Results, device, seeds=(1, 2, 3)) -> None:
    """Fresh inputs per seed; ORT outputs poisoned with NaN first so an unwritten element shows."""
    for name in denoisers:
        results.setdefault("parity", {})[name] = {"rel": [], "nan": False}
    for seed in seeds:
        inputs = fresh_inputs(spec, seed, device)
        with torch.inference_mode():
            ref = reference(*inputs)
        for name, denoise in denoisers.items():
            if name in network_outputs:
                network_outputs[name]().fill_(float("nan"))
            out = denoise(*inputs)
            entry = results["parity"][name]
            entry["rel"].append(rel(out, ref))
            entry["nan"] = entry["nan"] or bool(out.isnan().any())
    for name, entry in results["parity"].items():
        entry["max_rel"] = max(entry["rel"])
        entry["pass"] = not entry["nan"] and entry["max_rel"] < TOLERANCE
        log(f"parity {name}: max rel err {entry['max_rel']:.2e} vs float64 reference, nan={entry['nan']}")
    results.save()


def latency(denoisers: dict, spec, results: Results, device, warmup: int, iters: int) -> None:
    input_sets = [fresh_inputs(spec, 10 + i, device) for i in range(3)]
    for round_ in (1, 2):  # each version twice: the spread between rounds is the noise floor
        for name, denoise in denoisers.items():
            timing = time_ms(denoise, input_sets, warmup, iters)
            results.setdefault("latency", {}).setdefault(name, []).append(timing)
            log(f"round {round_} {name}: median {timing['median_ms']:.2f} ms")
            results.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget", type=float, default=240.0,
                        help="start the plain-attention variant only before this many seconds")
    parser.add_argument("--workdir", default="/tmp/vidrd-ort-bench")
    parser.add_argument("--model", default="vidrd-base", help="vidrd-base, or tiny for a CPU smoke run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16", help="fp16, or fp32 (ORT's CPU kernels are fp32)")
    args = parser.parse_args()
    make_importable()
    results = Results(command=" ".join(sys.argv), args=vars(args))
    device = torch.device(args.device)
    denoisers, outputs, spec, model = setup(args, results, device)
    reference = fp64_reference(model)
    parity(denoisers, outputs, reference, spec, results, device)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dtype = spec.inputs[0].dtype
    results["unet_flops"] = unet_flops(model.unet, [t.to(dtype) if t.is_floating_point() else t
                                                    for t in fresh_inputs(spec, 0, device)])
    latency(denoisers, spec, results, device, args.warmup, args.iters)
    table(results)  # printed now too: the plain variant below may not finish inside the call's time limit
    if time.time() - T0 < args.budget:
        plain_variant(model, spec, args, results)
        table(results)
    else:
        log(f"skipping the plain-attention variant: {time.time() - T0:.0f} s > budget {args.budget:.0f} s")


def setup(args, results: Results, device: torch.device):
    """Model, export, ORT session and torch denoiser."""
    import onnxruntime as ort

    from vidrd_rt.export.specs import EngineShapes, specs_for
    from vidrd_rt.runtime.backends import TorchDenoiser, prepare_for_device
    from vidrd_rt.runtime.config import RuntimeConfig
    from vidrd_rt.runtime.weights import ModelSource, load_model

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results["env"] = {"gpu": gpu, "torch": torch.__version__, "onnxruntime": ort.__version__,
                      "providers": ort.get_available_providers()}
    log(f"{results['env']}")
    start = time.perf_counter()
    shapes = EngineShapes(frames=args.frames, height=args.size, width=args.size, precision=args.precision)
    model = load_model(ModelSource(model=args.model, random_weights=True), shapes.torch_dtype, str(device))
    results["load_s"] = round(time.perf_counter() - start, 1)
    log(f"{args.model} {args.precision} on {device} in {results['load_s']} s")
    spec = specs_for(model.config, shapes)["unet"]
    results["input_shapes"] = spec.input_shapes(args.frames)
    path = export_variant(model, spec, Path(args.workdir) / "mha", "mha", results)
    check_cost(model, path, results)
    ort_mha, network = ort_denoiser(path, spec, results, "ort_session_mha", device)
    runtime = RuntimeConfig(device=str(device), dtype=args.precision)
    eager = TorchDenoiser(prepare_for_device(model, runtime), runtime)  # channels_last on CUDA, as generate runs it
    return ({f"torch_{args.precision}": eager, f"ort_{args.precision}_mha": ort_mha},
            {f"ort_{args.precision}_mha": lambda: network.output(args.frames)}, spec, model)


def fp64_reference(model):
    """The same (fp16-rounded) weights in float64: measures arithmetic error, not weight rounding. float64, not
    float32: torch's fp32 CPU GroupNorm on channels_last clip views loses digits to cancellation (seen here)."""
    unet = copy.deepcopy(model.unet).double()
    log("float64 reference UNet ready")

    @torch.inference_mode()
    def reference(sample, t, context):
        return unet(sample.double(), t, context.double())

    return reference


def plain_variant(model, spec, args, results: Results) -> None:
    """TensorRT's ONNX form under ORT: how much the fused MultiHeadAttention op is worth."""
    path = export_variant(model, spec, Path(args.workdir) / "plain", "onnx", results)
    device, name = torch.device(args.device), f"ort_{args.precision}_plain"
    ort_plain, network = ort_denoiser(path, spec, results, "ort_session_plain", device)
    reference = fp64_reference(model)
    parity({name: ort_plain}, {name: lambda: network.output(args.frames)}, reference, spec, results, device,
           seeds=(1,))
    del reference
    latency({name: ort_plain}, spec, results, device, args.warmup, args.iters)


def table(results: Results) -> None:
    flops = results.get("unet_flops", 0.0)
    args = results["args"]
    print(f"\nUNet step, {args['model']} {args['precision']}, input {results['input_shapes']['sample']} (CFG 2), "
          f"{flops / 1e12:.2f} TFLOP/step, {results['env']['gpu']}")
    print(f"{'variant':16s} {'median ms':>10s} {'2nd round':>10s} {'TFLOP/s':>8s} {'max rel err':>12s} {'pass':>5s}")
    for name, rounds in results.get("latency", {}).items():
        p = results.get("parity", {}).get(name, {})
        first, second = rounds[0]["median_ms"], rounds[-1]["median_ms"]
        print(f"{name:16s} {first:10.2f} {second:10.2f} {flops / first / 1e9:8.1f} "
              f"{p.get('max_rel', float('nan')):12.2e} {str(p.get('pass', '-')):>5s}")
    for key in ("export_mha", "export_onnx"):
        if key in results:
            print(f"{key}: {results[key]['seconds']} s, {results[key]['bytes'] / 1e9:.2f} GB (.onnx + .data)")
    if "check_s" in results:
        print(f"engine check before use: weights hash {results['check_s']['weights_hash']} s, "
              f"file sha256 {results['check_s']['files_sha256']} s")
    for key in ("ort_session_mha", "ort_session_plain"):
        if key in results:
            r = results[key]
            print(f"{key}: session {r['session_s']} s, first call {r['first_call_s']} s, "
                  f"device memory {r['device_bytes'] / 2**30:.1f} GiB, providers {r['providers'][:1]}")
    results["seconds_total"] = round(time.time() - T0, 1)
    results.save()


if __name__ == "__main__":
    main()
