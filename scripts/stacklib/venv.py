"""The project's virtual environment at .venv (package installed editable with its extras)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from .common import ROOT, STACK_DIR, VENV_PYTHON, StackError, apt_install, run_logged, say

VENV_DIR = ROOT / ".venv"
EXTRAS = "dev,bench"


def _venv_module_works() -> bool:
    """Debian splits `venv`/`ensurepip` into python3-venv; check they are importable."""
    probe = subprocess.run(
        [sys.executable, "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    return probe.returncode == 0


def ensure_venv() -> None:
    """Create .venv and install the package into it, unless .venv/bin/python exists."""
    if VENV_PYTHON.exists():
        return
    if sys.version_info < (3, 11):  # noqa: UP036 - `python3` may be older than the project
        raise StackError(f"Python >= 3.11 is needed for .venv, {sys.executable} is older")
    if not _venv_module_works():
        apt_install(["python3-venv"], f"{sys.executable} cannot create virtual environments")
    log = STACK_DIR / "pip.log"
    say(f"creating .venv and installing the package with extras [{EXTRAS}] (log {log})")
    try:
        run_logged([sys.executable, "-m", "venv", str(VENV_DIR)], log, "python3 -m venv .venv")
        pip = [str(VENV_PYTHON), "-m", "pip", "install", "--disable-pip-version-check"]
        run_logged([*pip, "-e", f".[{EXTRAS}]"], log, "pip install -e '.[dev,bench]'", cwd=ROOT)
    except StackError:
        # We made this .venv: remove the half-made one so the next `up` starts over.
        shutil.rmtree(VENV_DIR, ignore_errors=True)
        raise
