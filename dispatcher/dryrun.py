"""Dry runs: what a send would do, without sending or recording anything.

`POST /send?dryRun=true` (or `"dryRun": true` in the body) and `dispatcher render` go through the
checks of a real send (`Dispatcher.prepare`: channels, template, compilation, attachments), select
the same users (the store's stream, the same `__STATE__` rule, requested ids that match no one),
and render the messages of the first `[dispatcher].preview_users` users with the plan a real send
uses (`ChannelPlan.message_for`, under the same render budget). Every other user is counted, not
rendered: selected when it has a valid address for the channel, skipped when it has none, failed
when the address is invalid. Nothing reaches a provider and nothing is written to the ledger.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from actors.resolver import Unmatched

from .messages import Delivery, EmailContent, Message, PushContent, TextContent, User
from .plan import ChannelPlan, addresses_of, has_text_for

if TYPE_CHECKING:
    from .core import Dispatcher
    from .models import SendRequest
    from .settings import Settings

# Skipped deliveries and failures listed in the answer (all are counted).
MAX_LISTED = 100


def preview_of(message: Message) -> dict[str, Any]:
    """A rendered message as JSON: what the provider would be handed."""
    entry: dict[str, Any] = {"channel": message.channel, "userId": message.user_id, "to": list(message.addresses)}
    content = message.content
    if isinstance(content, EmailContent):
        options = content.options
        entry.update(
            {
                "from": options.sender,
                "subject": content.subject,
                "text": content.text,
                "html": content.html,
                "cc": list(options.cc),
                "bcc": list(options.bcc),
                "attachments": [
                    {"filename": a.filename, "contentType": a.content_type, "bytes": len(a.content)}
                    for a in options.attachments
                ],
            }
        )
    elif isinstance(content, TextContent):
        entry.update({"from": content.sender, "body": content.body})
    elif isinstance(content, PushContent):
        entry.update(dataclasses.asdict(content))
    return entry


class _Tally:
    def __init__(self) -> None:
        self.users = 0
        self.selected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.skipped_list: list[dict[str, str]] = []
        self.failures: list[dict[str, str]] = []

    def skip(self, user_id: str, channel: str) -> None:
        self.skipped[channel] += 1
        if len(self.skipped_list) < MAX_LISTED:
            self.skipped_list.append({"userId": user_id, "channel": channel, "reason": "no address"})

    def fail(self, user_id: str, channel: str, error: str) -> None:
        self.failed[channel] += 1
        if len(self.failures) < MAX_LISTED:
            self.failures.append({"userId": user_id, "channel": channel, "error": error})


async def dry_run(dispatcher: Dispatcher, request: SendRequest, preview_users: int | None = None) -> dict[str, Any]:
    """The answer of a dry run of `request` (see the module's docstring); `RequestError` for what
    a real send would refuse."""
    if preview_users is None:
        preview_users = dispatcher.settings.dispatcher.preview_users
    plan = await dispatcher.prepare(request)
    store = dispatcher.store
    tally = _Tally()
    previews: list[dict[str, Any]] = []
    missing = Unmatched(request.recipients)
    async for batch in store.stream_users(request.recipients, request.clusters):
        missing.saw(store.user_id(user) for user in batch)
        shown_now = batch[: max(0, preview_users - tally.users)]
        tally.users += len(batch)
        for lane in plan.channels:
            outcomes = await dispatcher.render_jobs(lane, shown_now, request.data) if shown_now else []
            for user, outcome in zip(shown_now, outcomes):
                if isinstance(outcome, Message):
                    tally.selected[lane.channel] += 1
                    previews.append(preview_of(outcome))
                elif isinstance(outcome, Delivery) and outcome.status == "skipped":
                    tally.skip(lane.id_of(user), lane.channel)
                elif isinstance(outcome, Delivery):
                    tally.fail(lane.id_of(user), lane.channel, outcome.error or "failed")
                else:  # RenderBudgetExceeded: the delivery would fail
                    tally.fail(lane.id_of(user), lane.channel, str(outcome))
            for user in batch[len(shown_now) :]:
                _count(lane, user, tally)
    for user_id in missing.ids():
        for lane in plan.channels:
            tally.fail(user_id, lane.channel, "user not found")
    return {
        "dryRun": True,
        "previews": previews,
        "skipped": tally.skipped_list,
        "failures": tally.failures,
        "summary": {
            "users": tally.users,
            "selected": dict(tally.selected),
            "skipped": dict(tally.skipped),
            "failed": dict(tally.failed),
        },
    }


def _count(lane: ChannelPlan, user: User, tally: _Tally) -> None:
    """A user beyond the previews: its address decides, as it would before rendering."""
    addresses = addresses_of(user.get(lane.address_field))
    user_id = lane.id_of(user)
    if not addresses:
        tally.skip(user_id, lane.channel)
    elif not all(lane.valid_address(a) for a in addresses):
        tally.fail(user_id, lane.channel, f"invalid address: not a valid {lane.channel} address")
    else:
        tally.selected[lane.channel] += 1


async def render_template(
    settings: Settings, template_id: str, user_id: str, data: dict[str, Any], channels: Sequence[str] = ()
) -> dict[str, Any]:
    """`dispatcher render`: the dry run of one template for one user, on `channels` (default: the
    active channels the template has text for). Opens the store without the ledger and without
    Redis, so that nothing is resumed, sent or recorded meanwhile."""
    from .core import open_dispatcher
    from .errors import RequestError
    from .models import SendRequest

    quiet = settings.model_copy(
        update={
            "store": settings.store.model_copy(update={"ledger": False}),
            "cluster": settings.cluster.model_copy(update={"redis_url": SecretStr("")}),
        }
    )
    async with open_dispatcher(quiet) as dispatcher:
        if not channels:
            template = await dispatcher.store.find_template(template_id)
            if template is None:
                raise RequestError(f"templateId: no template {template_id!r}")
            channels = [c for c in settings.channels.active if has_text_for(template, c)]
            if not channels:
                raise RequestError(f"templateId: the template has no text for any active channel ({template_id!r})")
        request = SendRequest.parse(
            {"channels": list(channels), "recipients": [user_id], "templateId": template_id, "data": data}
        )
        return await dry_run(dispatcher, request, preview_users=1)


__all__ = ["MAX_LISTED", "dry_run", "preview_of", "render_template"]
