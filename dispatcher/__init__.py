"""Multi-channel messaging dispatcher on Trio.

Embed it in any Trio program::

    settings = dispatcher.load_settings("config.toml")
    async with dispatcher.open_dispatcher(settings) as d:
        result = await d.send({"channels": ["email"], "clusters": ["beta"],
                               "messageTitle": "Hi", "messageContent": "Hello {{ user.name }}"})
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _package_version

from .callback_views import Callback, CallbackPage
from .core import Dispatcher, open_dispatcher
from .dryrun import DryRun, DryRunCounts, Skipped
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
from .job_views import DeliveryRecord, FailurePage, JobPage, JobStatus, ReceiptCounts, UserDeliveries
from .listing import JobQuery, Viewer
from .models import Failure, SendRequest, SendResult, Summary
from .settings import Settings, load_settings, settings_from_dict

try:
    __version__ = _package_version("trio-dispatcher")
except PackageNotFoundError:  # a source tree that was never installed (`pip install -e .` records it)
    __version__ = "0+unknown"

__all__ = [
    "Callback",
    "CallbackPage",
    "ConfigError",
    "Conflict",
    "DeliveryRecord",
    "Dispatcher",
    "DispatcherError",
    "DryRun",
    "DryRunCounts",
    "Failure",
    "FailurePage",
    "InternalError",
    "Interrupted",
    "JobPage",
    "JobQuery",
    "JobStatus",
    "NotFound",
    "PayloadTooLarge",
    "ReceiptCounts",
    "RequestError",
    "SendRequest",
    "SendResult",
    "Settings",
    "Skipped",
    "Summary",
    "UpstreamError",
    "UserDeliveries",
    "Viewer",
    "load_settings",
    "open_dispatcher",
    "settings_from_dict",
]
