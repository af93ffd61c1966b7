"""`python -m cosyvoice synth`: writes a WAV, and turns bad input into one line and exit status 2."""
import subprocess
import sys

import soundfile as sf

from cosyvoice.cli import main
from cosyvoice.loading.model_dir import read_config


def test_synth_writes_a_wav(model_dir, fixture_dir, tmp_path, capsys):
    out = tmp_path / "out.wav"
    status = main(["synth", "--model-dir", str(model_dir), "--mode", "cross_lingual", "--text", "Hello there.",
                   "--prompt-wav", str(fixture_dir / "reference" / "prompt.wav"), "--out", str(out),
                   "--stream", "--seed", "1", "--device", "cpu"])
    assert status == 0
    info = sf.info(out)
    sample_rate = read_config(model_dir / "cosyvoice2.yaml").resolve("sample_rate")
    assert info.samplerate == sample_rate and info.channels == 1 and info.frames > 0
    assert "first after" in capsys.readouterr().out


def test_bad_input_is_one_line_and_status_2(model_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cosyvoice", "synth", "--model-dir", str(model_dir),
                             "--mode", "cross_lingual", "--text", "Hi.", "--prompt-wav", str(tmp_path / "none.wav")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: prompt audio {tmp_path / 'none.wav'} does not exist"]


def test_demo_makes_a_tiny_model_once_and_speaks(tmp_path, capsys):
    model_dir, out = tmp_path / "demo-model", tmp_path / "demo.wav"
    args = ["demo", "--model-dir", str(model_dir), "--out", str(out), "--text", "Hi there.", "--device", "cpu"]
    assert main(args) == 0
    assert "made a tiny random-weight model" in capsys.readouterr().out
    assert sf.info(out).frames > 0
    assert main(args) == 0
    assert "made a tiny" not in capsys.readouterr().out
