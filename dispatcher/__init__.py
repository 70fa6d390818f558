"""Multi-channel messaging dispatcher on Trio.

Embed it in any Trio program::

    settings = dispatcher.load_settings("config.toml")
    async with dispatcher.open_dispatcher(settings) as d:
        result = await d.send({"channels": ["email"], "clusters": ["beta"],
                               "messageTitle": "Hi", "messageContent": "Hello {{ user.name }}"})
"""

from .core import Dispatcher, InternalError, open_dispatcher
from .errors import ConfigError, DispatcherError, PayloadTooLarge, RequestError, UpstreamError
from .models import Failure, SendRequest, SendResult, Summary
from .settings import Settings, load_settings, settings_from_dict

__all__ = [
    "ConfigError",
    "Dispatcher",
    "DispatcherError",
    "Failure",
    "InternalError",
    "PayloadTooLarge",
    "RequestError",
    "SendRequest",
    "SendResult",
    "Settings",
    "Summary",
    "UpstreamError",
    "load_settings",
    "open_dispatcher",
    "settings_from_dict",
]
