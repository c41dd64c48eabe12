"""Bridges to other libraries. Each submodule imports its library; nothing here imports one eagerly."""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import sys
from typing import Callable

# The loading hooks the transformers integration uses (HfQuantizer.get_quantize_ops, ConversionOps, per-key
# weight streaming) are those of transformers 5.x; 4.x loaded quantized weights through other hooks.
TESTED_TRANSFORMERS_MAJOR = 5


def transformers_problem() -> str | None:
    """Why the installed transformers cannot take llm_int8's integration (not installed, or not 5.x),
    or None when it can. The one version check: ``import llm_int8`` registers with transformers only when
    this is None, and ``llm_int8.integrations.hf`` raises it as an ImportError otherwise. Reads the
    installed package's metadata only: it does not import transformers."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "llm_int8.integrations.hf needs transformers; install the extra: pip install 'llm-int8[hf]'"
    if version.split(".")[0] != str(TESTED_TRANSFORMERS_MAJOR):
        return (
            f"llm_int8.integrations.hf works with transformers {TESTED_TRANSFORMERS_MAJOR}.x, found {version}; "
            "install a supported one: pip install 'llm-int8[hf]'"
        )
    return None


def call_when_imported(module_name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once the top-level module ``module_name`` is imported: now if it already is,
    else right after its own code has run, on the first ``import`` of it.

    This lets ``import llm_int8`` register with a library without importing it (peft takes seconds
    to import and pulls in bitsandbytes); the registration happens when the user imports it.
    """
    if module_name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(module_name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    """A finder that never finds anything itself: it asks the finders after it for ``module_name`` and
    makes the loader of what they found call the callback once the module has been executed.

    ``importlib.util.find_spec`` (as used by availability checks) also reaches here without importing;
    the loader of such a spec is never executed, so the callback waits for a real import.
    """

    def __init__(self, module_name: str, callback: Callable[[], None]):
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_call(module):
            exec_module(module)
            if self in sys.meta_path:  # the first import to finish registers; later ones find the module
                sys.meta_path.remove(self)
                self.callback()

        loader.exec_module = exec_then_call  # this spec's own loader instance
        return spec
