"""Built-in methods: one module per method family, each registering itself with
``@register_method``. Every module in this package is imported on the first registry lookup,
so adding a method is adding a file here and nothing else."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
