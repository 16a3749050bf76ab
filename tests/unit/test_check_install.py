"""tools/check_install.py, which `make install` runs: it passes on this checkout's own install and names what is
wrong for another checkout, a missing requirement or a too-old one."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_install", ROOT / "tools" / "check_install.py")
check_install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_install)


def _checkout(tmp_path: Path, requirements: list[str], dev: list[str]) -> Path:
    (tmp_path / "dist_lm").mkdir()
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup\n"
        f"setup(name='dist_lm', install_requires={requirements!r}, extras_require={{'dev': {dev!r}}})\n")
    return tmp_path


def test_setup_requirements_are_read_from_the_literals_of_setup_py():
    reqs = check_install.setup_requirements(ROOT / "setup.py")
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("pytest") for r in reqs)


def test_this_checkout_passes_in_the_interpreter_that_runs_the_tests():
    # the test suite runs from `make test`, which installs this checkout first
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_install.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_another_checkout_and_unmet_requirements_are_each_named(tmp_path):
    other = _checkout(tmp_path, ["torch>=2.5", "numpy>=999", "no-such-package-dist-lm>=1"],
                      ["pytest>=8.0", "nothing-for-this-platform>=1; platform_system == 'Plan9'"])
    found = check_install.problems(other)
    assert any("not from this checkout" in p and str(other) in p for p in found), found
    assert any(p.startswith("numpy ") and "numpy>=999" in p for p in found), found
    assert any("no-such-package-dist-lm is not installed" in p for p in found), found
    assert not any(p.startswith(("torch", "pytest", "nothing-for-this-platform")) for p in found), found
    assert len(found) == 3, found
