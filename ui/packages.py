"""xattn's packages install under their own top-level names (README, "Import names"); this makes sure they are the
ones Python finds.

Another distribution's `pipelines` or `shapes` (both exist on PyPI), or a folder of that name in the working
directory, would hide xattn's, and the first import from it would fail with a bare "No module named ...".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HOME = Path(__file__).resolve().parent.parent
PACKAGES = ("xattn", "editors", "pipelines", "shapes")


def hidden_packages() -> list[str]:
    """A line per package of xattn's that Python would import from elsewhere, naming where; empty when none is."""
    lines = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin != HOME / name / "__init__.py":
            found = f"the one at {origin.parent}" if origin else "none is found" if spec is None else "a namespace package"
            lines.append(f"xattn's package {name!r} ({HOME / name}) is hidden: {found}")
    return lines


def require_own_packages() -> None:
    """Exit with what hides which package and the fix, before an import from a hidden one fails obscurely."""
    hidden = hidden_packages()
    if hidden:
        raise SystemExit("\n".join([*hidden, "uninstall the other distribution, run xattn from another folder, or install xattn "
                                    "into its own virtual environment (make install)"]))
