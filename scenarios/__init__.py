"""Every scenario, registered by name when this package is imported (one module per data family)."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "base":
        continue
    importlib.import_module(f"{__name__}.{_info.name}")
