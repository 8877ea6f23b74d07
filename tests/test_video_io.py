"""Streaming video writers and resume storage, checked on real files decoded back with PyAV, Pillow and numpy."""

import ctypes
import os
import random
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vidrd_rt.runtime.errors import UserError
from vidrd_rt.runtime.video_io import (
    NPY_HEADER_BYTES, ClipFrameStore, OutputError, atomic_file, atomic_torch_save, atomic_write_bytes,
    check_output_path, open_writer, output_kind, run_dir_for,
)

H, W, FPS = 48, 64, 8
KINDS = {"mp4": "v.mp4", "gif": "v.gif", "npy": "v.npy", "png": "frames"}
SATURATED = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def smooth_clip(start: int, n: int = 6, h: int = H, w: int = W) -> np.ndarray:
    """Slowly moving low-frequency colour gradients: easy for H.264, so PSNR measures the pipeline, not the codec."""
    y, x = np.mgrid[0:h, 0:w] / (2 * max(h, w))
    t = np.arange(start, start + n)[:, None, None] / 20
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + t))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - t))
    b = 0.5 + 0.4 * np.sin(2 * np.pi * (x + y + 0.5 * t))
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)  # [n, h, w, 3]


def saturated_clip() -> np.ndarray:
    """A grey ramp, then vertical and horizontal bands of pure colours: each frame needs its own palette."""
    y, x = np.mgrid[0:H, 0:W]
    clip = np.zeros((3, H, W, 3), np.uint8)
    clip[0] = (x * 4)[..., None]
    clip[1] = SATURATED[(x // 11) % 6]
    clip[2] = SATURATED[::-1][(y // 8) % 6]
    return clip


def decode(path: str) -> np.ndarray:
    """Every frame of an output, uint8 [F, H, W, 3], read back with the library that fits its form."""
    if path.endswith(".mp4"):
        with av.open(path) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    if path.endswith(".gif"):
        with Image.open(path) as im:
            return np.stack([np.asarray(im.seek(i) or im.convert("RGB")) for i in range(im.n_frames)])
    if path.endswith(".npy"):
        return np.load(path)
    names = sorted(os.listdir(path))
    return np.stack([np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names])


def snapshot(path: str) -> dict[str, bytes]:
    """File name -> bytes for a file or a PNG folder, to compare outputs byte for byte."""
    if os.path.isdir(path):
        return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}
    return {"": open(path, "rb").read()}


def out_path(folder, kind: str) -> str:
    """The output path for `kind` in `folder`; a PNG folder is named with its trailing slash."""
    return os.path.join(folder, KINDS[kind]) + ("/" if kind == "png" else "")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255**2 / mse)


def write_all(path: str, clips: list[np.ndarray], **kw) -> str | None:
    writer = open_writer(path, FPS, H, W, **kw)
    for clip in clips:
        writer.write(clip)
    return writer.close()


def hidden_leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".")]


##### output_kind / check_output_path


@pytest.mark.parametrize("path, kind", [("a.mp4", "mp4"), ("a/b.MP4", "mp4"), ("x.gif", "gif"), ("x.npy", "npy"),
                                        ("frames/", "png"), ("/tmp/", "png")])
def test_output_kind_by_form(path, kind):
    assert output_kind(path) == kind


def test_output_kind_existing_folder_is_png(tmp_path):
    assert output_kind(str(tmp_path)) == "png"


@pytest.mark.parametrize("path", ["x.avi", "video", "", "x.mp4.tmp"])
def test_unknown_form_names_the_choices(path):
    with pytest.raises(OutputError, match=r"unknown output form .*use \.mp4, \.gif, \.npy or a folder ending in /"):
        output_kind(path)


def test_missing_parent_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(str(tmp_path / "nope" / "x.mp4"))


def test_parent_is_a_regular_file(tmp_path):
    (tmp_path / "somefile").write_bytes(b"")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_path(str(tmp_path / "somefile" / "x.mp4"))


def test_unwritable_folder_is_caught_even_as_root():
    # /proc passes os.access(W_OK) for root but no file can be created in it: only the real probe sees that.
    if not os.path.isdir("/proc") or os.access("/proc", os.W_OK) is False:
        pytest.skip("needs Linux /proc")
    with pytest.raises(OutputError, match="cannot (create files in|write in) '/proc'"):
        check_output_path("/proc/x.mp4")
    with pytest.raises(OutputError, match="choose a writable folder"):
        open_writer("/proc/x.gif", FPS, H, W)


def test_existing_folder_with_file_extension(tmp_path):
    (tmp_path / "v.mp4").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(str(tmp_path / "v.mp4"))


def test_png_folder_must_be_empty_or_new(tmp_path):
    folder = tmp_path / "frames"
    assert check_output_path(f"{folder}/") == "png"  # new
    folder.mkdir()
    assert check_output_path(f"{folder}/") == "png"  # empty
    (folder / "old.txt").write_text("x")
    with pytest.raises(OutputError, match="pick an empty or new folder"):
        check_output_path(f"{folder}/")
    assert check_output_path(f"{folder}/", overwrite=True) == "png"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_path(f"{tmp_path / 'file'}/")


def test_mp4_needs_even_size(tmp_path):
    path = str(tmp_path / "v.mp4")
    with pytest.raises(OutputError, match="even width and height, got 63x48"):
        check_output_path(path, 48, 63)
    with pytest.raises(OutputError, match="even width and height"):
        open_writer(path, FPS, 47, 64)
    assert os.listdir(tmp_path) == []
    assert check_output_path(str(tmp_path / "v.gif"), 47, 63) == "gif"


def test_output_error_is_a_user_error():
    # The CLI turns UserError into one line on stderr and exit code 2.
    assert issubclass(OutputError, UserError)


def test_bad_fps(tmp_path):
    with pytest.raises(OutputError, match="fps must be a positive"):
        open_writer(str(tmp_path / "v.mp4"), 0, H, W)


##### round trips per form


def test_mp4_round_trip(tmp_path):
    path = str(tmp_path / "v.mp4")
    clips = [smooth_clip(0), smooth_clip(6), smooth_clip(12)]
    assert write_all(path, clips) == path
    got, want = decode(path), np.concatenate(clips)
    assert got.shape == want.shape == (18, H, W, 3)
    assert psnr(got, want) > 38
    with av.open(path) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.average_rate == FPS
    data = open(path, "rb").read()
    assert data.find(b"moov") < data.find(b"mdat"), "+faststart puts the index before the media data"
    assert hidden_leftovers(tmp_path) == []


def test_gif_round_trip_colours(tmp_path):
    path = str(tmp_path / "v.gif")
    clip = saturated_clip()
    write_all(path, [clip, smooth_clip(0)])
    got = decode(path)
    assert got.shape == (9, H, W, 3)
    np.testing.assert_array_equal(got[:3], clip)  # <= 256 colours per frame: exact, per-frame palettes
    # Smooth gradients hold more than 256 colours: per-frame median cut is about 3.4 levels off on average,
    # the fixed 3-3-2 palette (ffmpeg's rgb8) about 18.
    assert np.abs(got[3:].astype(int) - smooth_clip(0)).mean() < 4.5
    with Image.open(path) as im:
        assert im.info["loop"] == 0  # forever
        delays = []
        for i in range(im.n_frames):
            im.seek(i)
            delays.append(im.info["duration"])
    assert abs(sum(delays) - 1000 * 9 / FPS) <= 10  # 8 fps: 12.5 cs a frame, written as 13, 12, 13, ...


def test_gif_palette_from_a_sample_keeps_pure_colours(tmp_path):
    # 300x400 is large enough that the palette is fitted on a strided sample of the pixels.
    y, x = np.mgrid[0:300, 0:400]
    frame = SATURATED[(x // 37 + y // 29) % 6][None]
    path = str(tmp_path / "big.gif")
    with open_writer(path, FPS, 300, 400) as writer:
        writer.write(frame)
    np.testing.assert_array_equal(decode(path), frame)


def test_png_folder_round_trip(tmp_path):
    path = f"{tmp_path / 'frames'}/"
    clips = [saturated_clip(), smooth_clip(0)]
    assert write_all(path, clips) == str(tmp_path / "frames")
    assert sorted(os.listdir(path)) == [f"frame_{i:06d}.png" for i in range(9)]
    np.testing.assert_array_equal(decode(path), np.concatenate(clips))
    assert hidden_leftovers(tmp_path) == []


def test_npy_round_trip_over_several_writes(tmp_path):
    path = str(tmp_path / "v.npy")
    clips = [smooth_clip(0, 5), smooth_clip(5, 1), saturated_clip(), smooth_clip(0, 0)]
    writer = open_writer(path, FPS, H, W)
    for clip in clips:
        writer.write(clip)
    assert writer.frames_written == 9
    writer.close()
    np.testing.assert_array_equal(np.load(path), np.concatenate(clips))
    assert np.load(path, mmap_mode="r").shape == (9, H, W, 3)
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[0] == (9, H, W, 3)
        assert f.tell() == NPY_HEADER_BYTES


def test_write_checks_frames(tmp_path):
    with open_writer(str(tmp_path / "v.npy"), FPS, H, W) as writer:
        for bad in [smooth_clip(0).astype(np.float32), smooth_clip(0)[0], smooth_clip(0, 2, H, W + 2)]:
            with pytest.raises(ValueError, match=r"uint8 \[F, 48, 64, 3\]"):
                writer.write(bad)
        writer.write(smooth_clip(0, 1))


##### close / abort / interruption


@pytest.mark.parametrize("kind", KINDS)
def test_close_at_an_interruption_point_gives_a_valid_file(tmp_path, kind):
    path = out_path(tmp_path, kind)
    writer = open_writer(path, FPS, H, W)
    clips = [smooth_clip(0), smooth_clip(6)]
    for clip in clips:
        writer.write(clip)
    assert not os.path.exists(path)
    # SIGINT arrives here: the caller stops between clips and closes.
    assert writer.close() == os.path.normpath(path)
    assert writer.close() == os.path.normpath(path)  # idempotent, as a signal path may call it twice
    writer.abort()  # after close: keeps the finished file
    assert decode(path).shape == (12, H, W, 3)
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_abort_leaves_nothing(tmp_path, kind):
    writer = open_writer(out_path(tmp_path, kind), FPS, H, W)
    writer.write(smooth_clip(0))
    writer.abort()
    writer.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.write(smooth_clip(0))


@pytest.mark.parametrize("kind", KINDS)
def test_exception_inside_with_aborts(tmp_path, kind):
    with pytest.raises(RuntimeError, match="sampler failed"):
        with open_writer(out_path(tmp_path, kind), FPS, H, W) as writer:
            writer.write(smooth_clip(0))
            raise RuntimeError("sampler failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", KINDS)
def test_close_without_frames_writes_no_file(tmp_path, kind):
    with open_writer(out_path(tmp_path, kind), FPS, H, W) as writer:
        writer.write(smooth_clip(0, 0))
    assert writer.close() is None
    assert os.listdir(tmp_path) == []


def test_stale_partial_from_a_killed_run_is_replaced(tmp_path):
    (tmp_path / ".v.npy.partial").write_bytes(b"garbage")
    assert write_all(str(tmp_path / "v.npy"), [smooth_clip(0)])
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), smooth_clip(0))
    assert hidden_leftovers(tmp_path) == []


def test_existing_output_file_is_replaced(tmp_path):
    path = tmp_path / "v.gif"
    path.write_bytes(b"old")
    write_all(str(path), [saturated_clip()])
    np.testing.assert_array_equal(decode(str(path)), saturated_clip())


##### determinism and resume


@pytest.mark.parametrize("kind", ["mp4", "gif"])
def test_reencode_is_byte_identical(tmp_path, kind):
    clips = [smooth_clip(0), saturated_clip() if kind == "gif" else smooth_clip(20)]
    write_all(str(tmp_path / f"a.{kind}"), clips)
    # Another clip split must not matter either: the encoder sees the same frame sequence.
    write_all(str(tmp_path / f"b.{kind}"), [np.concatenate(clips)[:4], np.concatenate(clips)[4:]])
    assert snapshot(str(tmp_path / f"a.{kind}")) == snapshot(str(tmp_path / f"b.{kind}"))


def dirty_heap(seed: int) -> None:
    """Leave freed C-heap blocks full of junk, as a long run does: encoders that read memory they never wrote vary."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    rng = random.Random(seed)
    blocks = []
    for _ in range(200):
        size = rng.choice([256, 4096, 65536, 300_000, 2_000_000])
        blocks.append(libc.malloc(size))
        ctypes.memset(blocks[-1], rng.randrange(256), size)
    for block in blocks:
        libc.free(block)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dirties the glibc heap through ctypes")
def test_mp4_is_byte_identical_over_a_dirty_heap(tmp_path):
    # 96x96 was the most sensitive size to libx264's AVX-512 mbtree reads: with mbtree on, 12 runs gave 5 files.
    clip = smooth_clip(0, 16, 96, 96)
    files = set()
    for seed in range(6):
        dirty_heap(seed)
        with open_writer(str(tmp_path / "v.mp4"), FPS, 96, 96) as writer:
            writer.write(clip)
        files.add(open(tmp_path / "v.mp4", "rb").read())
    assert len(files) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_matches_uninterrupted_run(tmp_path, kind):
    clips = [smooth_clip(6 * i) for i in range(4)]
    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    straight = out_path(tmp_path / "straight", kind)
    write_all(straight, clips)

    # Interrupted run: two clips finish (stored for resume), then close() keeps a playable file.
    resumed = out_path(tmp_path / "resumed", kind)
    store = ClipFrameStore(run_dir_for(resumed))
    writer = open_writer(resumed, FPS, H, W)
    for i, clip in enumerate(clips[:2]):
        writer.write(clip)
        store.append(i, clip)
    writer.close()
    assert decode(resumed).shape[0] == 12

    # Resumed run: re-encode the stored clips, then continue.
    write_all(resumed, clips[2:], resume_frames=store.iter_clips(), overwrite=True)
    store.remove_all()
    assert snapshot(resumed) == snapshot(straight)
    assert os.listdir(tmp_path / "resumed") == [os.path.basename(os.path.normpath(resumed))]


##### ClipFrameStore and atomic helpers


def test_clip_store_round_trip(tmp_path):
    store = ClipFrameStore(str(tmp_path / "run"))
    assert store.clips() == []
    clips = {2: smooth_clip(12), 0: smooth_clip(0), 1: saturated_clip()}
    for i, clip in clips.items():
        store.append(i, clip)
    assert store.clips() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path / "run")) == ["clip_000000.npy", "clip_000001.npy", "clip_000002.npy"]
    for i, clip in clips.items():
        np.testing.assert_array_equal(store.load(i), clip)
    assert [c.shape[0] for c in store.iter_clips()] == [6, 3, 6]
    store.append(1, smooth_clip(0, 2))  # a re-run clip replaces the old one
    np.testing.assert_array_equal(store.load(1), smooth_clip(0, 2))
    store.remove_all()
    assert not (tmp_path / "run").exists()


def test_clip_store_refuses_a_gap(tmp_path):
    store = ClipFrameStore(str(tmp_path))
    store.append(0, smooth_clip(0, 1))
    store.append(2, smooth_clip(0, 1))
    with pytest.raises(OutputError, match=r"holds clips \[0, 2\]"):
        store.iter_clips()
    with pytest.raises(ValueError, match="uint8"):
        store.append(3, smooth_clip(0, 1).astype(np.float32))
    assert store.clips() == [0, 2]


def test_atomic_file_failure_midway_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "clip_000000.npy")
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b"half a clip")
            raise RuntimeError("disk full")
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["clip_000000.npy"]


def test_clip_store_ignores_a_write_killed_midway(tmp_path):
    # A process killed while writing clip 1 leaves only a hidden temp: clip 1 does not count as done.
    store = ClipFrameStore(str(tmp_path / "run"))
    script = textwrap.dedent(f"""
        import os, numpy as np
        from vidrd_rt.runtime.video_io import ClipFrameStore, atomic_file
        store = ClipFrameStore({store.run_dir!r})
        store.append(0, np.zeros((2, 4, 4, 3), np.uint8))
        with atomic_file(store.path(1)) as f:
            f.write(b"half a clip")
            f.flush()
            os._exit(9)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 9
    assert store.clips() == [0]
    assert len(os.listdir(store.run_dir)) == 2  # clip 0 and the hidden temp
    assert [c.shape for c in store.iter_clips()] == [(2, 4, 4, 3)]
    store.remove_all()
    assert not os.path.exists(store.run_dir)


def test_atomic_torch_save(tmp_path):
    path = str(tmp_path / "state.pt")
    atomic_torch_save({"latents": torch.arange(6.0)}, path)
    assert torch.equal(torch.load(path)["latents"], torch.arange(6.0))

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle")

    with pytest.raises(TypeError):
        atomic_torch_save({"big": torch.zeros(100_000), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["latents"], torch.arange(6.0))
    assert os.listdir(tmp_path) == ["state.pt"]
