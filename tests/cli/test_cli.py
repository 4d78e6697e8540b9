"""The ``l2vit`` command line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from l2vit.cli import main


def test_zoo_prints_params_macs_and_shapes(capsys):
    assert main(['zoo', '--models', 'test_l2vit', 'l2vit_tiny', '--sizes', '224x224', '257x191']) == 0
    out = capsys.readouterr().out
    assert '28,596,781' in out and '4.69' in out
    assert '(1, 1000); 96x56x56, 192x28x28, 384x14x14, 768x7x7' in out
    assert '96x65x48, 192x33x24, 384x17x12, 768x9x6' in out


def test_zoo_rejects_bad_size(capsys):
    assert main(['zoo', '--models', 'test_l2vit', '--sizes', '224by224']) == 2
    assert 'size must look like 224x320' in capsys.readouterr().err


def test_python_dash_m_and_console_script():
    out = subprocess.run([sys.executable, '-m', 'l2vit', '--help'], capture_output=True, text=True, check=True)
    assert 'zoo' in out.stdout and 'convert' in out.stdout
    script = Path(sys.executable).with_name('l2vit')
    if script.exists():  # installed as a console script (the editable install of `make` is)
        out = subprocess.run([str(script), '--version'], capture_output=True, text=True, check=True)
        assert out.stdout.startswith('l2vit ')
    out = subprocess.run([sys.executable, '-m', 'l2vit', 'convert', '/no/such/file.pth', '/tmp/x'],
                         capture_output=True, text=True)
    assert out.returncode == 2 and 'checkpoint file not found' in out.stderr
