"""The one place samunet imports segment-anything from.

``segment_anything/__init__.py`` imports its automatic mask generator and predictor, which
import torchvision; next to a CPU-only torch the installed torchvision raises a RuntimeError on
import (see docs/architecture.md). samunet only needs the model classes in
``segment_anything.modeling``, which import nothing but torch, so this helper registers a bare
package object with the real ``__path__`` and imports the ``modeling`` subpackage from it,
never running the package ``__init__``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import lru_cache

_PACKAGE = "segment_anything"


@lru_cache(maxsize=1)
def sam_modeling() -> types.ModuleType:
    """Return ``segment_anything.modeling`` (MaskDecoder, PromptEncoder, ImageEncoderViT, ...)."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("segment-anything is not installed; install samunet with "
                              "`bash scripts/install.sh` or `pip install segment-anything==1.0`")
        package = types.ModuleType(_PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.modeling")
