"""Every method, registered by NAME when this package is imported.

Each module (or sub-package) of this package that defines a ``@register``-ed Method is imported
here; a module whose optional dependency is missing registers nothing and is skipped.
"""

import importlib
import pkgutil

_SKIP = {"common"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name in _SKIP:
        continue
    importlib.import_module(f"{__name__}.{_info.name}")
