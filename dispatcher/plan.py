"""A validated request, ready to run: which channels, compiled templates, request-wide options.

Everything that can make a request invalid is checked while building the plan, before a single
task starts, so request errors never travel inside an `ExceptionGroup`. `Planner` is what plans
a request: it reads the template from the store and the attachments from the Files Service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import logging

from .channels import CHANNELS, BuildContext, BuildFn, RenderFn
from .errors import RenderError, RequestError
from .files import FilesClient
from .handlebars import HandlebarsSyntaxError, translate
from .messages import EmailOptions, Message, User
from .models import SendRequest, shown
from .settings import Settings
from .store import Store
from .templating import PRERENDERED, Renderer, Text

log = logging.getLogger(__name__)


def has_text_for(template: dict[str, Any], channel: str) -> bool:
    """Whether a template has what `channel` needs (`CHANNELS[channel].template_fields`)."""
    groups = CHANNELS[channel].template_fields
    return all(any(isinstance(template.get(f), str) and template[f] != "" for f in group) for group in groups)


def _check_template(template: dict[str, Any], channel: str) -> None:
    groups = CHANNELS[channel].template_fields
    if not has_text_for(template, channel):
        needed = " and ".join(" or ".join(group) for group in groups)
        raise RequestError(f"templateId: the template has no {channel} text (needs {needed})")


def template_attachments(template: dict[str, Any] | None) -> list[str]:
    """`emailAttachments` of a template: strings, or objects with at least `file`."""
    names: list[str] = []
    for item in (template or {}).get("emailAttachments") or []:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and isinstance(item.get("file"), str):
            names.append(item["file"])
        else:
            raise RequestError(f"template emailAttachments: unsupported entry {item!r}")
    return names


@dataclass(frozen=True, slots=True)
class ChannelPlan:
    """Turns one user into this channel's message, or None when the user has no address."""

    channel: str
    address_field: str
    build: BuildFn
    id_of: Callable[[User], str]
    valid_address: Callable[[str], bool] = lambda address: True
    # The compiled texts `build` renders; those not `inline` are rendered in worker processes.
    texts: tuple[Text, ...] = ()

    def needs_rendering(self, user: User) -> bool:
        """Whether `message_for` would render texts for `user` (it has an address)."""
        return bool(addresses_of(user.get(self.address_field)))

    def message_for(
        self, user: User, data: dict[str, Any], rendered: dict[Text, str | RenderError] | None = None
    ) -> Message | None:
        """None when the user has no address; `RenderError` for an address no provider would
        accept (checked here, the same for every provider, the outbox included). `rendered`:
        the texts a worker process rendered for this user (the others render here)."""
        addresses = addresses_of(user.get(self.address_field))
        if not addresses:
            return None
        invalid = [a for a in addresses if not self.valid_address(a)]
        if invalid:
            raise RenderError(f"invalid address: {shown(invalid[0], 40)} is not a valid {self.channel} address")
        context: dict[str, Any] = {"user": user, "data": data}
        if rendered:
            context[PRERENDERED] = rendered
        content = self.build(context)
        return Message(self.channel, self.id_of(user), addresses, content)

    @property
    def isolated(self) -> tuple[Text, ...]:
        """The texts to render in a worker process (they can run away)."""
        return tuple(text for text in self.texts if not text.inline)


def address_field(channel: str, settings: Settings) -> str:
    """The user field that holds a channel's address(es)."""
    return CHANNELS[channel].address_field(settings)


def addresses_of(value: Any) -> tuple[str, ...]:
    """A user's address field as distinct non-empty strings (one, or several device tokens)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    # Duplicated tokens would make a device ring twice.
    return tuple(dict.fromkeys(v.strip() for v in value if isinstance(v, str) and v.strip()))


@dataclass(frozen=True, slots=True)
class RequestPlan:
    request: SendRequest
    channels: tuple[ChannelPlan, ...]


class Planner:
    """Plans requests for one dispatcher: every check that can reject a request (channels,
    template, compilation, attachments) happens in `prepare`."""

    def __init__(self, settings: Settings, store: Store, files: FilesClient | None) -> None:
        self._settings = settings
        self._store = store
        self._files = files
        limits = settings.templates
        self.renderer = Renderer(
            default_locale=limits.default_locale,
            max_template_chars=limits.max_template_chars,
            max_rendered_chars=limits.max_rendered_chars,
        )

    async def prepare(self, request: SendRequest) -> RequestPlan:
        template = None
        if request.template_id is not None:
            template = await self._store.find_template(request.template_id)
            if template is None:
                log.info(
                    "no template %s in %s (load templates with `dispatcher seed`)",
                    shown(request.template_id),
                    self._settings.store.templates_collection,
                )
                raise RequestError(f"templateId: no template {shown(request.template_id)}")
        email_options = None
        if any(CHANNELS[channel].uses_email_options for channel in request.channels):
            email_options = await self._email_options(request, template)
        return build_plan(request, template, self._settings, self.renderer, email_options, self._store.user_id)

    async def _email_options(self, request: SendRequest, template: dict[str, Any] | None) -> EmailOptions:
        names = [*template_attachments(template), *request.email_attachments]
        attachments: tuple = ()
        if names:
            if self._files is None:
                raise RequestError("emailAttachments: no Files Service is configured ([files].url)")
            attachments = await self._files.fetch_all(names)
        return EmailOptions(
            sender=request.email_sender or self._settings.sender.email,
            cc=request.email_carbon_copies,
            bcc=request.email_blind_carbon_copies,
            attachments=attachments,
        )


def build_plan(
    request: SendRequest,
    template: dict[str, Any] | None,
    settings: Settings,
    renderer: Renderer,
    email_options: EmailOptions | None,
    id_of: Callable[[User], str],
) -> RequestPlan:
    """Check the request against the template and the configuration, and compile every text."""
    active = settings.channels.active
    for channel in request.channels:
        if channel not in active:
            raise RequestError(f"channels: {channel!r} is not an active channel")
    if template is not None:
        for channel in request.channels:
            _check_template(template, channel)
    texts = _TextSource(request, template, renderer, settings)
    context = BuildContext(settings, email_options)
    plans = []
    for channel in request.channels:
        texts.compiled = []
        build = CHANNELS[channel].build(texts, context)
        plans.append(
            ChannelPlan(
                channel,
                address_field(channel, settings),
                build,
                id_of,
                CHANNELS[channel].valid_address,
                tuple(texts.compiled),
            )
        )
    return RequestPlan(request, tuple(plans))


ENGINES = ("handlebars", "jinja")


class _TextSource:
    """Compiles a text from the template field, or from the request's own title/content, in the
    syntax it is written in: a stored template's `engine` (else `[templates].default_engine`),
    or `[templates].request_engine` for the request's texts. Handlebars is translated into Jinja,
    so both run in the same sandbox under the same limits. `compiled` collects what it compiled
    (the texts of one channel's builder)."""

    def __init__(
        self, request: SendRequest, template: dict[str, Any] | None, renderer: Renderer, settings: Settings
    ) -> None:
        self.request = request
        self._template = template
        self._renderer = renderer
        self._engine = settings.templates.request_engine
        self.compiled: list[Text] = []
        if template is not None:
            self._engine = template.get("engine") or settings.templates.default_engine
            if self._engine not in ENGINES:
                raise RequestError(
                    f"templateId: the template's engine {shown(self._engine)} is not one of {', '.join(ENGINES)}"
                )

    def get(self, template_field: str, request_value: str | None = None, *, html: bool = False) -> RenderFn | None:
        if self._template is not None:
            source = self._template.get(template_field)
            if not isinstance(source, str) or source == "":
                return None
            return self._compile(source, html, f"template {template_field}")
        if request_value is None:
            return None
        field = {"emailTitle": "messageTitle", "pushTitle": "messageTitle"}.get(template_field, "messageContent")
        return self._compile(request_value, False, field)

    def _compile(self, source: str, html: bool, field: str) -> RenderFn:
        text = self._compile_text(source, html, field)
        self.compiled.append(text)
        return text

    def _compile_text(self, source: str, html: bool, field: str) -> Text:
        if self._engine == "jinja":
            return self._renderer.compile(source, html=html, field=field)
        # The limit applies to what the author wrote; the translation is longer.
        self._renderer.check_length(source, field)
        try:
            translated = translate(source)
        except HandlebarsSyntaxError as exc:
            raise RequestError(f"{field}: template does not compile: {exc}") from None
        return self._renderer.compile(
            translated.jinja, html=html, field=field, length_checked=True, inline=not translated.loops
        )
