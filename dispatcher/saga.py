"""`POST /saga/send`: the Flow Manager's command, mapped to a send, and the event that answers it.

The command is `{"key": sagaId, "value": {"messageLabel": ..., "messagePayload": {...}}}`.
`[flow_manager].metadata_schema` maps fields of a send to dot paths in the command: from its
root, and, when the path does not resolve there, under `value.messagePayload` (the predecessor's
documentation leaves the root open; both readings work). A path may name a string or an array:
list fields take a string as a list of one, text fields an array of one string as that string.
The template `data` is the whole command, or what `data_path` names; a command that maps no
`templateId` takes the one `template_ids` gives its `messageLabel`.

The route answers 200 with an empty body once the send is accepted (validated and recorded as a
job), and an error in the usual shape otherwise. The send is idempotent per (saga id, label): its
`Idempotency-Key` is derived from them, so a command the Flow Manager delivers again sends
nothing again and gets the same 200.

Events (when `service_url` and both labels are set): `{"key": sagaId, "value": {"messageLabel":
success|fail label, "messagePayload": {}}}` is POSTed to `{service_url}{event_path}`. Success
once the job is done (failed deliveries of single users included: they are reported in the job,
as `POST /send` reports them), fail when the command is refused with a 4xx or the job fails or is
cancelled. Events live in a collection (`[flow_manager].events_collection`), one document per
(saga id, label): written before the route answers, posted by whichever process of the service
gets to them, retried with capped exponential backoff, then given up (`dead`, logged). A service
that stops between accepting a command and recording its event (a few milliseconds) loses that
one event; the send itself is in the ledger and resumes.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

import httpx
import trio
from pymongo.errors import DuplicateKeyError, PyMongoError

from .errors import NotFound, RequestError, StoreError
from .ledger import FINAL_STATES
from .models import SendRequest, shown
from .settings import FlowManagerSettings

if TYPE_CHECKING:
    from pymongo.collection import Collection
    from quart_trio import QuartTrio

    from .core import Dispatcher
    from .ledger import Ledger

log = logging.getLogger(__name__)

_MISSING = object()
# Fields of a send that hold lists; the others hold one string.
_LIST_FIELDS = frozenset(
    {"channels", "recipients", "clusters", "emailAttachments", "emailCarbonCopies", "emailBlindCarbonCopies"}
)
PAYLOAD_PATH = "value.messagePayload"
# How often waiting events look at their jobs (and due events are posted) without a wake-up.
POLL_SECONDS = 0.5


def resolve(document: Any, path: str) -> Any:
    """The value at a dot path (object keys, or list indexes), or `_MISSING`."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def lookup(command: dict[str, Any], path: str) -> Any:
    """`path` from the command's root, else under `value.messagePayload`."""
    value = resolve(command, path)
    if value is _MISSING:
        payload = resolve(command, PAYLOAD_PATH)
        if isinstance(payload, dict):
            value = resolve(payload, path)
    return value


def command_identity(payload: Any) -> tuple[str, str]:
    """The saga id and the command's `messageLabel`; `RequestError` for a body that is not a
    Flow Manager command."""
    if not isinstance(payload, dict):
        raise RequestError("the body must be a Flow Manager command object {key, value}")
    saga_id = payload.get("key")
    if not isinstance(saga_id, str) or not saga_id:
        raise RequestError("key: the saga id is required (a non-empty string)")
    value = payload.get("value")
    if not isinstance(value, dict):
        raise RequestError("value: required (an object with messageLabel and messagePayload)")
    label = value.get("messageLabel")
    if not isinstance(label, str) or not label:
        raise RequestError("value.messageLabel: required (a non-empty string)")
    if not isinstance(value.get("messagePayload", {}), dict):
        raise RequestError("value.messagePayload: must be an object")
    return saga_id, label


def to_send_request(command: dict[str, Any], settings: FlowManagerSettings) -> SendRequest:
    """The send a command asks for, through `metadata_schema`; `RequestError` naming the field."""
    body: dict[str, Any] = {}
    for name, path in settings.metadata_schema.items():
        value = lookup(command, path)
        if value is _MISSING or value is None:
            if name == "channels":
                raise RequestError(
                    f"channels: the command has nothing at {shown(path)} (metadataSchema.channels), "
                    f"from its root or under {PAYLOAD_PATH}"
                )
            continue
        if name in _LIST_FIELDS and isinstance(value, str):
            value = [value]
        elif name not in _LIST_FIELDS and isinstance(value, list) and len(value) == 1:
            value = value[0]
        body[name] = value
    label = command["value"]["messageLabel"]
    if "templateId" not in body and label in settings.template_ids:
        body["templateId"] = settings.template_ids[label]
    if settings.data_path:
        data = lookup(command, settings.data_path)
        if not isinstance(data, dict):
            raise RequestError(
                f"data: the command has no object at {shown(settings.data_path)} ([flow_manager].data_path)"
            )
        body["data"] = data
    else:
        body["data"] = command
    return SendRequest.parse(body)


class SagaEvents:
    """The durable outbox of Flow Manager events (see the module's docstring)."""

    def __init__(self, collection: Collection[dict[str, Any]], settings: FlowManagerSettings) -> None:
        self._events = collection
        self._settings = settings
        self._wake = trio.Event()

    async def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            raise StoreError(f"saga event {what} failed: {exc}") from exc

    async def _record(self, saga_id: str, label: str, **fields: Any) -> None:
        doc = {"_id": f"{saga_id}\x00{label}", "saga": saga_id, "command": label, "attempts": 0, **fields}
        try:
            await self._run("record", self._events.insert_one, doc)
        except DuplicateKeyError:
            return  # the command came again: its event is already recorded (or out)
        self._wake.set()

    async def expect(self, saga_id: str, label: str, job_id: str) -> None:
        """The outcome of `job_id` answers the command (success or fail once the job ends)."""
        await self._record(saga_id, label, job=job_id, state="waiting", next_at=time.time())

    async def fail(self, saga_id: str, label: str, reason: str) -> None:
        """The command was refused: the fail event goes out."""
        await self._record(
            saga_id,
            label,
            job=None,
            state="pending",
            event=self._settings.fail_event_label,
            reason=reason,
            next_at=time.time(),
        )

    async def run(self, ledger: Ledger) -> None:
        """Settle waiting events whose jobs ended and post the due ones, until cancelled."""
        async with httpx.AsyncClient(timeout=self._settings.event_timeout_seconds, follow_redirects=False) as http:
            while True:
                try:
                    await self._settle(ledger)
                    await self._post_due(http)
                except StoreError as exc:
                    log.warning("Flow Manager events: %s", exc)
                with trio.move_on_after(POLL_SECONDS):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _settle(self, ledger: Ledger) -> None:
        waiting = await self._run("lookup", lambda: list(self._events.find({"state": "waiting"}).limit(200)))
        for doc in waiting:
            job = await ledger.job(doc["job"])
            if job is not None and job["state"] not in FINAL_STATES:
                continue
            done = job is not None and job["state"] == "done"
            label = self._settings.success_event_label if done else self._settings.fail_event_label
            await self._run(
                "update",
                self._events.update_one,
                {"_id": doc["_id"], "state": "waiting"},
                {"$set": {"state": "pending", "event": label, "next_at": time.time()}},
            )

    async def _post_due(self, http: httpx.AsyncClient) -> None:
        now = time.time()
        due = await self._run(
            "lookup", lambda: list(self._events.find({"state": "pending", "next_at": {"$lte": now}}).limit(50))
        )
        url = self._settings.service_url.rstrip("/") + self._settings.event_path
        for doc in due:
            # Claimed for the length of one attempt: another process skips it meanwhile.
            claimed = await self._run(
                "claim",
                self._events.find_one_and_update,
                {"_id": doc["_id"], "state": "pending", "next_at": doc["next_at"]},
                {"$set": {"next_at": now + self._settings.event_timeout_seconds + 5}},
            )
            if claimed is None:
                continue
            event = {"key": doc["saga"], "value": {"messageLabel": doc["event"], "messagePayload": {}}}
            try:
                response = await http.post(url, json=event)
                error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            await self._settle_attempt(doc, error)

    async def _settle_attempt(self, doc: dict[str, Any], error: str | None) -> None:
        attempts = doc.get("attempts", 0) + 1
        if error is None:
            update: dict[str, Any] = {"state": "sent", "attempts": attempts, "sent_at": time.time()}
            log.info("Flow Manager event %s sent for saga %s", doc["event"], shown(doc["saga"]))
        elif attempts >= self._settings.event_max_attempts:
            update = {"state": "dead", "attempts": attempts, "error": error}
            log.error(
                "Flow Manager event %s for saga %s given up after %d attempts: %s",
                doc["event"],
                shown(doc["saga"]),
                attempts,
                error,
            )
        else:
            pause = min(
                self._settings.event_backoff_max_seconds, self._settings.event_backoff_seconds * 2 ** (attempts - 1)
            )
            update = {"attempts": attempts, "error": error, "next_at": time.time() + pause * random.uniform(0.8, 1.0)}
            log.warning(
                "Flow Manager event %s for saga %s failed (%s); retrying in %.1fs",
                doc["event"],
                shown(doc["saga"]),
                error,
                pause,
            )
        await self._run("update", self._events.update_one, {"_id": doc["_id"]}, {"$set": update})


def install_saga(app: QuartTrio, dispatcher: Dispatcher) -> None:
    """Add `POST /saga/send` and, with events configured, the task that posts them."""
    from quart import Response, g, request

    from .web import parse_json_body, status_of

    settings = dispatcher.settings.flow_manager
    events = None
    if settings.sends_events and dispatcher.ledger is not None:
        db = dispatcher.store.client[dispatcher.settings.store.database]
        events = SagaEvents(db[settings.events_collection], settings)

        scope = trio.CancelScope()

        async def run_events() -> None:
            assert dispatcher.ledger is not None and events is not None
            with scope:
                await events.run(dispatcher.ledger)

        @app.before_serving
        async def post_events() -> None:
            app.nursery.start_soon(run_events)

        @app.after_serving
        async def stop_events() -> None:
            # At once: the events wait in their collection for the next start (Quart would
            # otherwise wait BACKGROUND_TASK_SHUTDOWN_TIMEOUT for this endless task).
            scope.cancel()

    @app.post("/saga/send")
    async def saga_send() -> Any:
        if not settings.metadata_schema:
            raise NotFound(
                "POST /saga/send is not configured: set flowManagerConfiguration.metadataSchema "
                "([flow_manager].metadata_schema)"
            )
        payload = parse_json_body(await request.get_data(cache=False, as_text=False, parse_form_data=False))
        saga_id, label = command_identity(payload)
        if dispatcher.ledger is None:
            raise RequestError("POST /saga/send needs the delivery ledger ([store].ledger = true)")
        try:
            send_request = to_send_request(payload, settings)
            job_id = await dispatcher.submit(
                send_request, idempotency_key=f"saga\x00{saga_id}\x00{label}", key_scope=g.get("api_key_id") or ""
            )
        except RequestError as exc:
            # A refusal answers the saga; a 5xx (store down, shutting down) may be retried.
            if events is not None and status_of(exc) < 500:
                await events.fail(saga_id, label, str(exc))
            raise
        if events is not None:
            await events.expect(saga_id, label, job_id)
        return Response("", status=200)


__all__ = ["SagaEvents", "command_identity", "install_saga", "lookup", "to_send_request"]
