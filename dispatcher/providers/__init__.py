"""Delivery providers, selected per channel by `[channels.<name>].provider`.

`PROVIDERS` is the registry: a provider's name, the channels it can deliver, and how to create it
from the settings. Adding a provider is its module plus one entry here. Real providers are
imported only when configured, so the defaults need none of their SDKs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from ..sections import ProvidersSettings
from .base import Provider


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    name: str
    # None: any channel (the outbox writes whatever it is given).
    channels: frozenset[str] | None
    create: Callable[[ProvidersSettings], Provider]
    # The provider can be asked whether a message exists (`on_ambiguous = "reconcile"`).
    can_reconcile: bool = False

    def serves(self, channel: str) -> bool:
        return self.channels is None or channel in self.channels


def _outbox(settings: ProvidersSettings) -> Provider:
    from .outbox import OutboxProvider

    return OutboxProvider(settings.outbox.dir)


def _smtp(settings: ProvidersSettings) -> Provider:
    from .smtp import SmtpProvider

    return SmtpProvider(settings.smtp)


def _twilio(settings: ProvidersSettings) -> Provider:
    from .twilio import TwilioProvider

    return TwilioProvider(settings.twilio)


def _fcm(settings: ProvidersSettings) -> Provider:
    from .fcm import FcmProvider

    return FcmProvider(settings.fcm)


PROVIDERS: dict[str, ProviderEntry] = {
    entry.name: entry
    for entry in (
        ProviderEntry("outbox", None, _outbox),
        ProviderEntry("smtp", frozenset({"email"}), _smtp),
        ProviderEntry("twilio", frozenset({"sms", "voice"}), _twilio, can_reconcile=True),
        ProviderEntry("fcm", frozenset({"push"}), _fcm),
    )
}


@asynccontextmanager
async def open_providers(settings: ProvidersSettings, chosen: Mapping[str, str]) -> AsyncIterator[dict[str, Provider]]:
    """One provider per channel of `chosen` (channel: provider's name, as
    `settings.channels.providers()` gives them); a provider used by several channels is created
    once (Twilio serves SMS and voice with one client) and closed on exit."""
    by_name: dict[str, Provider] = {}
    async with AsyncExitStack() as stack:
        providers = {}
        for channel, name in chosen.items():
            if name not in by_name:
                by_name[name] = PROVIDERS[name].create(settings)
                stack.push_async_callback(by_name[name].aclose)
            providers[channel] = by_name[name]
        yield providers


__all__ = ["PROVIDERS", "Provider", "ProviderEntry", "open_providers"]
