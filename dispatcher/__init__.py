"""Multi-channel messaging dispatcher on Trio.

Embed it in any Trio program::

    settings = dispatcher.load_settings("config.toml")
    async with dispatcher.open_dispatcher(settings) as d:
        result = await d.send({"channels": ["email"], "clusters": ["beta"],
                               "messageTitle": "Hi", "messageContent": "Hello {{ user.name }}"})
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version as _package_version
from typing import TYPE_CHECKING, Any

try:
    __version__ = _package_version("trio-dispatcher")
except PackageNotFoundError:  # a source tree that was never installed (`pip install -e .` records it)
    __version__ = "0+unknown"

# The public API, by the module that defines each name. Imported lazily (PEP 562) so that the
# modules the actors depend on (`dispatcher.messages`, `dispatcher.plan`, ...) can be imported
# without importing `core`, which imports the actors: the dependency runs one way.
_EXPORTS = {
    "Dispatcher": "core",
    "open_dispatcher": "core",
    "ConfigError": "errors",
    "Conflict": "errors",
    "DispatcherError": "errors",
    "InternalError": "errors",
    "Interrupted": "errors",
    "NotFound": "errors",
    "PayloadTooLarge": "errors",
    "RequestError": "errors",
    "UpstreamError": "errors",
    "Failure": "models",
    "SendRequest": "models",
    "SendResult": "models",
    "Summary": "models",
    "Settings": "settings",
    "load_settings": "settings",
    "settings_from_dict": "settings",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .core import Dispatcher, open_dispatcher
    from .errors import (
        ConfigError,
        Conflict,
        DispatcherError,
        InternalError,
        Interrupted,
        NotFound,
        PayloadTooLarge,
        RequestError,
        UpstreamError,
    )
    from .models import Failure, SendRequest, SendResult, Summary
    from .settings import Settings, load_settings, settings_from_dict


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dispatcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
