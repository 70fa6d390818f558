"""Delivery providers, one per channel, selected by `[channels.<name>].provider`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from ..settings import Settings
from .base import Provider
from .outbox import OutboxProvider

__all__ = ["Provider", "OutboxProvider", "open_providers"]


def _create(name: str, settings: Settings) -> Provider:
    # Real providers are imported only when configured, so the defaults need none of their SDKs.
    if name == "outbox":
        return OutboxProvider(settings.providers.outbox.dir)
    if name == "smtp":
        from .smtp import SmtpProvider

        return SmtpProvider(settings.providers.smtp)
    if name == "twilio":
        from .twilio import TwilioProvider

        return TwilioProvider(settings.providers.twilio)
    if name == "fcm":
        from .fcm import FcmProvider

        return FcmProvider(settings.providers.fcm)
    raise ValueError(f"unknown provider {name!r}")


@asynccontextmanager
async def open_providers(settings: Settings) -> AsyncIterator[dict[str, Provider]]:
    """One provider per active channel; a provider used by several channels is created once
    (Twilio serves SMS and voice with one client) and closed on exit."""
    by_name: dict[str, Provider] = {}
    async with AsyncExitStack() as stack:
        providers = {}
        for channel in settings.channels.active:
            name = settings.channels[channel].provider
            if name not in by_name:
                by_name[name] = _create(name, settings)
                stack.push_async_callback(by_name[name].aclose)
            providers[channel] = by_name[name]
        yield providers
