"""The command line: inspect figures, and bad input as one line on stderr, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import run_cli

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TINY = ["--model", "tiny", "--random-weights"]


def test_inspect_counts(capsys):
    code, out, _ = run_cli(["inspect", "vidrd-base"], capsys)
    assert code == 0
    assert "1,182,401,284 parameters,   316,490,560 temporal" in out
    assert "100,059,495 parameters,    16,405,632 temporal" in out
    assert "340,387,840 parameters" in out


def test_inspect_json_equals_fixtures(capsys):
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures not present beside the checkout")
    code, out, _ = run_cli(["inspect", "vidrd-base", "--json"], capsys)
    layout = json.loads(out)
    for network, name in [("unet", "vidrd_unet3d_state_dict.json"), ("vae", "vidrd_temporal_vae_state_dict.json"),
                          ("text_encoder", "vidrd_text_encoder_state_dict.json")]:
        entries = json.loads((FIXTURES / name).read_text())["entries"]
        assert layout[network] == [e for e in entries if not e[0].endswith("position_ids")]


GENERATE = ["generate", "--prompt", "a red circle", *TINY, "--steps", "1", "--frames", "4", "--overlap", "1"]


@pytest.mark.parametrize("args, message", [
    (["--clips", "0"], "--clips must be at least 1"),
    (["--frames", "1"], "--frames must be at least 2"),
    (["--overlap", "9"], "--overlap must be in [0, --frames=4]"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--alpha", "-1"], "--alpha must be a finite number >= 0"),
    (["--beta", "1.5"], "--beta must be in [0, 1]"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--height", "100"], "--height 100 does not fit this model"),
    (["--width", "32"], "--width 32 does not fit this model"),
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--decoder", "x"], "--decoder must be temporal or per-frame"),
])
def test_generate_rejects_bad_numbers(tmp_path, capsys, args, message):
    out = tmp_path / "v.mp4"
    code, _, err = run_cli([*GENERATE, "--out", str(out), *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "the prompt is empty"),
    (["--out", "{tmp}/v.avi"], "unknown output form"),
    (["--out", "{tmp}/missing/v.mp4"], "missing"),
    (["--out", "{tmp}/file/v.mp4"], "file"),
    (["--model", "{tmp}/nowhere"], "not a folder"),
    (["--ckpt", "{tmp}/ModelT2V.pth", "--sd", "{tmp}/sd"], "give either --model or --ckpt"),
])
def test_generate_rejects_bad_paths_and_models(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("a regular file, not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = ["--out", str(tmp_path / "v.mp4")] if "--out" not in args else []
    code, _, err = run_cli([*GENERATE, *out, *args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_random_weights_without_architecture(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--random-weights", "--out", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and "--random-weights needs an architecture" in err
    assert list(tmp_path.iterdir()) == []


def test_long_prompt_is_truncated_with_a_warning(tmp_path, capsys, caplog):
    code, _, _ = run_cli([*GENERATE, "--prompt", "red " * 100, "--out", str(tmp_path / "v.npy")], capsys)
    assert code == 0 and "truncated" in caplog.text
    assert np.load(tmp_path / "v.npy").shape == (4, 64, 64, 3)


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vidrd_rt.cli", *GENERATE, "--clips", "0", "--out",
                           str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_sigint_keeps_finished_clips_and_resume_completes(tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "vidrd_rt.cli", *GENERATE, "--clips", "400", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".v.mp4.run" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "continue with --resume" in err and "Traceback" not in err
    with av.open(str(out)) as container:
        kept = sum(1 for _ in container.decode(video=0))
    assert kept >= 4 and kept % 4 == 0  # whole clips only, in a playable file
    done = subprocess.run([*cmd[:-2], "--clips", str(kept // 4 + 2), "--out", str(out), "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == kept + 8
    assert not os.path.exists(tmp_path / ".v.mp4.run")


def test_cli_runs_without_pyav():
    """Only writing video needs PyAV: `eval`, `bench`, `inspect` and the error handling of main() must not import it."""
    code = ("import sys; sys.modules['av'] = None; sys.argv = ['vidrd-rt', 'eval', '--help']\n"
            "from vidrd_rt.cli import main\nmain()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--prompts" in done.stdout
