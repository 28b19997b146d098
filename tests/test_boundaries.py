"""Import boundaries: the API never loads TensorFlow, nor other code it never runs."""

from __future__ import annotations

import subprocess
import sys


def test_api_import_does_not_import_tensorflow_or_numpy() -> None:
    # NumPy alone is ~20 MB of each API process's RSS (budget: 150 MB); the API decodes and
    # draws overlays with Pillow only (segsvc.ml.imaging).
    code = (
        "import sys; import api.app; app = api.app.create_app(); "
        "import api.wsgi; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'rich', 'pygments', 'numpy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
