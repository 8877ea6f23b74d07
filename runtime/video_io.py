"""Streaming video output (mp4 / gif / png folder / npy) with atomic finish, plus crash-safe clip storage for resume."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from .errors import UserError

_FILE_KINDS = {".mp4": "mp4", ".gif": "gif", ".npy": "npy"}
_FORMS = ".mp4, .gif, .npy or a folder ending in /"

# Byte-identical re-encodes (resume depends on them) need two libx264 settings, found by encoding the same
# frames 12-40 times per process with the heap poisoned in between:
# - mbtree=0: with mbtree on, this libx264's AVX-512 code gave 2-9 different files per size (48x64 to
#   320x576); capped at AVX2, or with mbtree off, every run matched. crf 18 still sets the quality (on a
#   synthetic moving 256x256 clip mbtree=0 gave a 16% smaller file at +0.4 dB PSNR).
# - a fixed thread count: x264 output depends on it, and the default (one per core) varies between machines.
#   One thread is as fast as four on a 512x512 clip here (about 21 ms a frame, far below sampling it).
X264_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
# Tag and convert as BT.709 limited range: browsers treat untagged H.264 inconsistently (601 vs 709).
_BT709 = 1  # AVCOL_PRI_BT709 == AVCOL_TRC_BT709 == AVCOL_SPC_BT709 == 1

PALETTE_SAMPLE_SIDE = 128  # GIF palettes are fitted on about this many pixels squared

# .npy header is padded to a fixed size so the final frame count can be written over the placeholder in place.
NPY_HEADER_BYTES = 128


class OutputError(UserError):
    """A bad output path or size, worded as one line saying what is wrong and how to fix it (CLI: exit 2)."""


##### path checks


def output_kind(path: str) -> str:
    """The writer kind for `path`: "mp4", "gif", "npy", or "png" for a folder (ends in / or is a folder)."""
    if path.endswith(("/", os.sep)):
        return "png"
    kind = _FILE_KINDS.get(os.path.splitext(path)[1].lower())
    if kind is not None:
        return kind
    if path and os.path.isdir(path):
        return "png"
    raise OutputError(f"unknown output form '{path}': use {_FORMS}")


def check_output_path(path: str, height: int | None = None, width: int | None = None, *,
                      overwrite: bool = False) -> str:
    """Return the kind of `path` after checking it can be written; raise OutputError before any work starts.

    `overwrite` lets a png folder that already holds files be replaced (a resumed run replacing its own
    interrupted output); output files are always replaced.
    """
    kind = output_kind(path)
    target = os.path.normpath(path)
    if kind == "png":
        _check_frame_folder(target, overwrite)
    elif os.path.isdir(target):
        raise OutputError(f"'{target}' is a folder: remove it or choose another file name for the {kind} output")
    _check_parent(os.path.dirname(os.path.abspath(target)))
    if height is not None and width is not None:
        _check_size(kind, height, width)
    return kind


def _check_frame_folder(folder: str, overwrite: bool) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"'{folder}' exists and is not a folder: choose a new folder for the PNG frames")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise OutputError(f"output folder '{folder}' is not empty: pick an empty or new folder")


def _check_parent(folder: str) -> None:
    if not os.path.exists(folder):
        raise OutputError(f"output folder '{folder}' does not exist: create it first or choose another path")
    if not os.path.isdir(folder):
        raise OutputError(f"'{folder}' is not a folder: put the output inside an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in '{folder}' (permission denied): choose a writable folder")
    _probe_create(folder)


def _probe_create(folder: str) -> None:
    # os.access says yes to root everywhere; only a real create catches read-only mounts and pseudo filesystems.
    probe = os.path.join(folder, f".vidrd-write-test-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"cannot create files in '{folder}' ({err.strerror}): choose a writable folder") from err


def _check_size(kind: str, height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise OutputError(f"frame size must be positive, got {width}x{height}")
    if kind == "mp4" and (height % 2 or width % 2):
        raise OutputError(f"mp4 (yuv420p) needs even width and height, got {width}x{height}: "
                          "use an even size or write .gif, .npy or a PNG folder")


def _check_fps(fps: int) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise OutputError(f"fps must be a positive whole number, got {fps!r}")


##### atomic files


def _partial_path(final: str) -> str:
    folder, name = os.path.split(os.path.normpath(final))
    return os.path.join(folder, f".{name}.partial")


def _fsync_path(path: str) -> None:
    # Works for files and folders; a folder fsync makes a rename inside it durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """Yield a binary file next to `path`; a clean exit renames it over `path`, an error leaves `path` untouched."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_path(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj: object, path: str) -> None:
    """torch.save `obj` to `path` atomically (temp file in the same folder, fsync, rename)."""
    import torch  # torch is only needed by callers that save tensors; the video writers do not use it

    with atomic_file(path) as f:
        torch.save(obj, f)


##### writers


class VideoWriter:
    """Appends uint8 frames [F, H, W, 3] clip by clip to a hidden partial output; close() publishes it.

    Memory stays flat: every frame goes to the encoder or disk as it arrives. close() after any number of
    write() calls gives a valid file holding every frame written; with no frames it leaves no file and
    returns None. abort() removes everything partial. Both are idempotent, and abort() after close() keeps
    the finished file. In a `with` block an exception aborts, so on SIGINT call close() before re-raising.
    write() should not be interrupted midway (turn signals into a flag checked between clips).
    """

    kind = ""

    def __init__(self, path: str, fps: int, height: int, width: int, overwrite: bool = False):
        self.path = os.path.normpath(path)
        self.fps, self.height, self.width = fps, height, width
        self.overwrite = overwrite
        self.partial_path = _partial_path(self.path)
        self._count = 0
        self._state = "open"
        _remove(self.partial_path)  # a stale partial from a killed run
        try:
            self._open()
        except BaseException:
            _remove(self.partial_path)
            raise

    @property
    def frames_written(self) -> int:
        return self._count

    def write(self, frames: np.ndarray) -> None:
        """Append one clip of frames, uint8 [F, H, W, 3]."""
        if self._state != "open":
            raise ValueError(f"write() on a {self._state} writer for '{self.path}'")
        for frame in self._checked(frames):
            self._write_frame(frame)
            self._count += 1

    def close(self) -> str | None:
        """Finish the file and move it to its final path; return that path, or None when no frame was written."""
        if self._state != "open":
            return self.path if self._state == "closed" else None
        if self._count == 0:
            self.abort()
            return None
        try:
            self._finish()
            self._publish()
        except Exception as err:
            self.abort()
            raise OutputError(f"could not finish '{self.path}': {err}") from err
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Drop the output: release the encoder and remove every partial file."""
        if self._state != "open":
            return
        self._state = "aborted"
        with contextlib.suppress(Exception):
            self._release()
        _remove(self.partial_path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _checked(self, frames: np.ndarray) -> np.ndarray:
        want = (self.height, self.width, 3)
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
                or frames.shape[1:] != want:
            got = f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}"
            raise ValueError(f"frames must be uint8 [F, {self.height}, {self.width}, 3], got {got}")
        return np.ascontiguousarray(frames)

    def _publish(self) -> None:
        os.replace(self.partial_path, self.path)
        _fsync_path(os.path.dirname(os.path.abspath(self.path)))

    # Subclass hooks: open the partial output, take one [H, W, 3] frame, flush + fsync, release handles.
    def _open(self) -> None:
        raise NotImplementedError

    def _write_frame(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class _AvWriter(VideoWriter):
    """Shared PyAV plumbing: one video stream muxed into a container written at the partial path."""

    def _finish(self) -> None:
        self._container.mux(self._stream.encode())  # flush frames the encoder still holds
        self._container.close()  # writes the trailer (and moves moov to the front for +faststart)
        _fsync_path(self.partial_path)

    def _release(self) -> None:
        self._container.close()

    def _mux(self, frame: av.VideoFrame) -> None:
        frame.pts = self._count
        self._container.mux(self._stream.encode(frame))


class Mp4Writer(_AvWriter):
    """H.264 yuv420p at crf 18, BT.709 tagged, moov first (+faststart) so browsers start playing at once."""

    kind = "mp4"

    def _open(self) -> None:
        # The partial name has no .mp4 suffix, so the container format is named; ffmpeg reopens the file
        # by name for +faststart, which a Python file object would not allow.
        self._container = av.open(self.partial_path, "w", format="mp4", options={"movflags": "+faststart"})
        self._stream = self._container.add_stream("libx264", rate=self.fps, options=X264_OPTIONS)
        cc = self._stream.codec_context
        cc.width, cc.height, cc.pix_fmt = self.width, self.height, "yuv420p"
        cc.color_primaries = cc.color_trc = cc.colorspace = _BT709
        cc.color_range = ColorRange.MPEG

    def _write_frame(self, frame: np.ndarray) -> None:
        rgb = av.VideoFrame.from_ndarray(frame, format="rgb24")
        self._mux(rgb.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG))


class GifWriter(_AvWriter):
    """Looping GIF, each frame with its own 256-colour palette (ffmpeg writes it as a local colour table)."""

    kind = "gif"

    def _open(self) -> None:
        # loop=0 is "forever"; ffmpeg turns pts in 1/fps units into centisecond delays without drift.
        self._container = av.open(self.partial_path, "w", format="gif", options={"loop": "0"})
        self._stream = self._container.add_stream("gif", rate=self.fps)
        cc = self._stream.codec_context
        cc.width, cc.height, cc.pix_fmt = self.width, self.height, "pal8"

    def _write_frame(self, frame: np.ndarray) -> None:
        self._mux(_pal8_frame(frame))


def _pal8_frame(frame: np.ndarray) -> av.VideoFrame:
    """One frame as pal8 with its own 256-colour palette (median cut), no dithering: per-frame dither flickers."""
    # Median cut slows with the number of distinct colours (180 ms for a 256x256 frame), so the palette is fitted
    # on a strided sample of about 128x128 real pixels (20 ms at 512x512) and every pixel mapped to its nearest entry.
    step = max(1, -(-max(frame.shape[:2]) // PALETTE_SAMPLE_SIDE))
    sample = Image.fromarray(np.ascontiguousarray(frame[::step, ::step]))
    palette = sample.quantize(256, method=Image.Quantize.MEDIANCUT)
    image = Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE)
    rgb = np.asarray(image.getpalette()[:768], dtype=np.uint8).reshape(-1, 3)
    argb = np.zeros((256, 4), dtype=np.uint8)  # PyAV wants ARGB rows
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((np.asarray(image), argb), format="pal8")


class PngFolderWriter(VideoWriter):
    """One PNG per frame, frame_000000.png ..., in a hidden partial folder renamed into place on close."""

    kind = "png"

    def _open(self) -> None:
        os.mkdir(self.partial_path)

    def _write_frame(self, frame: np.ndarray) -> None:
        name = os.path.join(self.partial_path, f"frame_{self._count:06d}.png")
        with open(name, "wb") as f:
            Image.fromarray(frame).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())

    def _finish(self) -> None:
        _fsync_path(self.partial_path)

    def _release(self) -> None:
        pass

    def _publish(self) -> None:
        # rename() replaces an empty folder but not a full one; a replaced full folder (overwrite=True) is
        # moved aside first, so for a moment neither exists, but the old frames never mix with the new.
        old = self.partial_path[: -len(".partial")] + ".replaced"
        if os.path.isdir(self.path) and os.listdir(self.path):
            _remove(old)
            os.replace(self.path, old)
        super()._publish()
        _remove(old)


class NpyWriter(VideoWriter):
    """uint8 [frames, H, W, 3] .npy: fixed-size header rewritten with the final count at close, raw frames appended."""

    kind = "npy"

    def _open(self) -> None:
        self._file = open(self.partial_path, "wb")
        self._file.write(_npy_header((0, self.height, self.width, 3)))

    def _write_frame(self, frame: np.ndarray) -> None:
        self._file.write(memoryview(frame).cast("B"))

    def _finish(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header((self._count, self.height, self.width, 3)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _release(self) -> None:
        self._file.close()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """An .npy v1.0 header for uint8 C-order `shape`, space-padded to exactly NPY_HEADER_BYTES."""
    fmt = np.lib.format
    d = {"descr": fmt.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": tuple(shape)}
    text = repr(d).encode("latin1")
    prefix = fmt.magic(1, 0)
    size = NPY_HEADER_BYTES - len(prefix) - 2  # 2 bytes: little-endian uint16 header length
    assert len(text) < size, f"npy header for shape {shape} does not fit in {NPY_HEADER_BYTES} bytes"
    return prefix + struct.pack("<H", size) + text.ljust(size - 1) + b"\n"


_WRITERS = {"mp4": Mp4Writer, "gif": GifWriter, "png": PngFolderWriter, "npy": NpyWriter}


def open_writer(path: str, fps: int, height: int, width: int, *,
                resume_frames: Iterable[np.ndarray] | None = None, overwrite: bool = False) -> VideoWriter:
    """Check `path` and open the writer its form selects; `resume_frames` (clips, e.g. ClipFrameStore.iter_clips())
    are written first, so a resumed run yields the same file as an uninterrupted one."""
    kind = check_output_path(path, height, width, overwrite=overwrite)
    _check_fps(fps)
    writer = _WRITERS[kind](path, int(fps), height, width, overwrite)
    if resume_frames is not None:
        try:
            for frames in resume_frames:
                writer.write(frames)
        except BaseException:
            writer.abort()
            raise
    return writer


##### clip storage for resume


_CLIP_NAME = re.compile(r"clip_(\d{6})\.npy")


def run_dir_for(output_path: str) -> str:
    """The hidden run folder next to an output, e.g. out/.video.mp4.run for out/video.mp4."""
    folder, name = os.path.split(os.path.normpath(output_path))
    return os.path.join(folder, f".{name}.run")


class ClipFrameStore:
    """The uint8 frames of each completed clip as run_dir/clip_000012.npy, each file written atomically."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def path(self, clip_index: int) -> str:
        return os.path.join(self.run_dir, f"clip_{clip_index:06d}.npy")

    def append(self, clip_index: int, frames: np.ndarray) -> None:
        """Store one finished clip, uint8 [F, H, W, 3]; a crash midway leaves no clip file, only a hidden temp."""
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
            raise ValueError(f"clip frames must be a uint8 [F, H, W, 3] array, got {getattr(frames, 'shape', frames)}")
        os.makedirs(self.run_dir, exist_ok=True)
        with atomic_file(self.path(clip_index)) as f:
            np.save(f, frames, allow_pickle=False)

    def clips(self) -> list[int]:
        """Sorted indices of the complete clips on disk."""
        if not os.path.isdir(self.run_dir):
            return []
        found = (_CLIP_NAME.fullmatch(name) for name in os.listdir(self.run_dir))
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, clip_index: int) -> np.ndarray:
        return np.load(self.path(clip_index), allow_pickle=False)

    def iter_clips(self) -> Iterator[np.ndarray]:
        """The stored clips in order, loaded one at a time; they must be clips 0..n-1 without a gap."""
        indices = self.clips()
        if indices != list(range(len(indices))):
            raise OutputError(f"run folder '{self.run_dir}' holds clips {indices}, not 0..{len(indices) - 1}: "
                              "delete it to start the run over")
        return (self.load(i) for i in indices)

    def remove_all(self) -> None:
        """Delete the clip files and leftover temps; the run folder goes too once nothing else is in it."""
        if not os.path.isdir(self.run_dir):
            return
        for name in os.listdir(self.run_dir):
            if _CLIP_NAME.fullmatch(name) or (name.startswith(".clip_") and name.endswith(".partial")):
                _remove(os.path.join(self.run_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.run_dir)
