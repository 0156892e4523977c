import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLE = Path(__file__).parent.parent / "examples" / "forward.py"


def test_forward_example_runs(tiny_ckpt, tmp_path):
    """The README's main job: one forward pass over a generated image, and over an image file."""
    out = subprocess.run([sys.executable, str(EXAMPLE), str(tiny_ckpt)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "prompt tokens" in out.stdout and len(out.stdout.strip().splitlines()) == 6
    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "green.png")
    out = subprocess.run([sys.executable, str(EXAMPLE), str(tiny_ckpt), str(tmp_path / "green.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(1, 14, 22) image grid" in out.stdout


def test_forward_example_without_arguments_prints_its_usage():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("usage: python ") and "MODEL_DIR [IMAGE_PATH]" in out.stderr
