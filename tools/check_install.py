"""Is this checkout installed into this interpreter? Exit 0 if so, else say why and exit 1 (`make install` then
installs). Keyed on the interpreter, not on a stamp file in the checkout: a second checkout, a new venv or a
requirement added to setup.py is noticed, and so is a dist_lm that imports from another checkout.

What must hold: `import dist_lm` resolves to this checkout's dist_lm/ (an editable install of it), and every
requirement of setup.py (install_requires and the "dev" extras) is installed at a version it accepts. The
requirements are read from setup.py's literals (ast), so an edit to setup.py is seen before it is reinstalled.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors the same library
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def setup_requirements(setup_py: Path, extras: tuple[str, ...] = ("dev",)) -> list[str]:
    """The requirement strings of setup.py's setup() call: install_requires plus the named extras."""
    tree = ast.parse(setup_py.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            args = {kw.arg: kw.value for kw in node.keywords}
            found = list(ast.literal_eval(args["install_requires"]))
            extra = ast.literal_eval(args["extras_require"]) if "extras_require" in args else {}
            for name in extras:
                found += extra.get(name, [])
            return found
    raise ValueError(f"{setup_py} has no setup(...) call with literal requirements")


def problems(root: Path = ROOT) -> list[str]:
    """Why this interpreter does not run this checkout with everything it needs ([] when it does)."""
    out = []
    spec = importlib.util.find_spec("dist_lm")
    if spec is None or spec.origin is None:
        out.append("dist_lm is not installed")
    elif Path(spec.origin).resolve().parent != root / "dist_lm":
        out.append(f"dist_lm imports from {Path(spec.origin).resolve().parent}, not from this checkout ({root})")
    for line in setup_requirements(root / "setup.py"):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # not for this platform
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{req.name} is not installed ({line})")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name} {version} is installed; setup.py asks for {line}")
    return out


if __name__ == "__main__":
    found = problems()
    for problem in found:
        print(f"make install: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
