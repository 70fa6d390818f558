"""The OpenAPI 3.1 document of the service (`GET /-/openapi.json`, browsable at `GET /-/docs`).

Schemas are generated from pydantic models: `SendRequest` (the model that validates the body of
`POST /send`) and, for the answers, small models below that mirror `SendResult`, `Failure`,
`Summary` and the error shape. The request schema is completed with what its validators enforce
and JSON Schema can say (the channels this deployment accepts, no duplicates) and a description
of each field, unless the model already gives one.

The document describes the routes the app actually has (`openapi_for(app, settings)`), so a
route that is not there yet (the job API) does not appear, and a route without an entry here is
caught by the tests.
"""

from __future__ import annotations

import copy
import html
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .auth import is_protected
from .channels import CHANNELS
from .listing import CURSOR_PATTERN
from .models import CALLBACK_EVENTS, IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_PATTERN, SendRequest

REF = "#/components/schemas/{model}"
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
if TYPE_CHECKING:
    ChannelName = str
else:
    # The registered channels, known only once `channels` has run: an enum in the schemas.
    ChannelName = Literal[tuple(CHANNELS)]
_COUNTS = dict[ChannelName, NonNegativeInt]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class Failure(_Wire):
    """One (user, channel) delivery that did not succeed."""

    userId: str
    channel: ChannelName
    error: str = Field(description="Short reason; names the provider's error code when there is one")


class Summary(_Wire):
    """Users selected and, per channel, deliveries sent, skipped (no address) and failed; channels
    with a zero count are omitted."""

    users: int = Field(ge=0)
    sent: _COUNTS
    skipped: _COUNTS
    failed: _COUNTS
    cancelled: _COUNTS = Field(
        default_factory=dict, description="Deliveries stopped by `DELETE /send/{id}`; present only when there are some"
    )


class JobSummary(Summary):
    """A job's counts: the send's, and of the sent deliveries, where receipts took them since
    (they keep arriving after the job ended)."""

    delivered: _COUNTS = Field(default_factory=dict, description="Of the sent, those a provider receipt confirmed")
    undelivered: _COUNTS = Field(default_factory=dict, description="Of the sent, those a receipt said did not arrive")
    unconfirmed: _COUNTS = Field(
        default_factory=dict,
        description="Of the sent, those without a receipt after `[ledger].receipt_timeout_hours`",
    )


class SendResult(_Wire):
    """The answer once every delivery was attempted (retries included)."""

    failures: list[Failure]
    summary: Summary
    id: str | None = Field(
        None, description="The job's id (also in `Location`); absent without the ledger ([store].ledger = false)"
    )


class DryRunSummary(_Wire):
    users: NonNegativeInt = Field(description="Users selected")
    selected: _COUNTS = Field(default_factory=dict, description="Deliveries that would be attempted")
    skipped: _COUNTS = Field(default_factory=dict, description="Users without an address for the channel")
    failed: _COUNTS = Field(default_factory=dict, description="Deliveries that would fail before any provider call")


class SkippedDelivery(_Wire):
    userId: str
    channel: ChannelName
    reason: str


class DryRunResult(_Wire):
    """`POST /send?dryRun=true`: what the send would do; nothing was sent or recorded."""

    dryRun: Literal[True]
    previews: list[dict[str, Any]] = Field(
        description="The rendered messages of the first `[dispatcher].preview_users` users, one per (user, channel)"
    )
    skipped: list[SkippedDelivery] = Field(description="The first 100 deliveries that would be skipped")
    failures: list[Failure] = Field(description="The first 100 deliveries that would fail")
    summary: DryRunSummary


class Error(_Wire):
    """Every 4xx/5xx answer."""

    statusCode: int = Field(ge=400, le=599)
    error: str = Field(description="The HTTP reason phrase")
    message: str


class JobAccepted(_Wire):
    """`POST /send` in asynchronous mode: the job to poll at `Location`."""

    id: str
    status: JobState


class JobStatus(_Wire):
    """A job: its state, counts so far and times."""

    id: str
    status: JobState
    summary: JobSummary | None = None
    createdAt: datetime | None = None
    startedAt: datetime | None = None
    finishedAt: datetime | None = None
    error: str | None = Field(None, description="Why a job failed, when it did")
    requestId: str | None = Field(None, description="The `X-Request-ID` of the request that created the job")
    channels: list[str] = Field(default_factory=list, description="The channels the job delivers on")


class Callback(_Wire):
    """A callback (one POST to the client's callbackUrl, tried until delivered or dead)."""

    id: str = Field(description="Its `webhook-id`, the same on every try")
    type: Literal["job.finished", "delivery.updated"]
    jobId: str | None = None
    requestId: str | None = None
    url: str = Field(description="The callback URL without its query string")
    state: Literal["pending", "delivered", "dead"]
    events: int = Field(ge=1, description="Events it carries (delivery.updated is batched)")
    attempts: int = Field(ge=0)
    createdAt: datetime
    nextAttemptAt: datetime | None = None
    lastError: str | None = None


class CallbackPage(_Wire):
    """One page of callbacks, newest first; pass `next` as `cursor` for the next page."""

    callbacks: list[Callback]
    next: str | None = None


class JobPage(_Wire):
    """One page of jobs, newest first; pass `next` as `cursor` for the next page (null: the last)."""

    jobs: list[JobStatus]
    next: str | None = None


class FailuresPage(_Wire):
    """One page of a job's failures, in a stable order; pass `next` as `after` for the next page."""

    failures: list[Failure]
    next: str | None = None


class Receipt(_Wire):
    """One provider receipt that moved a delivery."""

    status: str = Field(description="The provider's word (Twilio MessageStatus or CallStatus)")
    state: Literal["sent", "delivered", "undelivered"]
    code: str | None = Field(None, description="The provider's error code, when it gave one")
    at: datetime | None = None


class DeliveryHistory(_Wire):
    """One delivery of one user: where it stands and how it got there."""

    channel: ChannelName
    state: Literal["sending", "sent", "delivered", "undelivered", "unconfirmed", "failed", "skipped", "cancelled"]
    attempts: int = Field(ge=0)
    providerId: str | None = Field(None, description="The provider's id (Twilio SID, FCM name, Message-ID)")
    error: str | None = None
    failure: Literal["permanent", "temporary"] | None = Field(None, description="For `undelivered`")
    claimedAt: datetime | None = Field(None, description="When it was claimed `sending`, just before the call")
    settledAt: datetime | None = Field(None, description="When its outcome was recorded")
    receiptAt: datetime | None = Field(None, description="When the last receipt moved it")
    receipts: list[Receipt]
    reconciled: str | None = Field(None, description="How an ambiguous attempt was resolved with the provider")


class UserDeliveries(_Wire):
    """One user's deliveries in one job, one per channel."""

    id: str
    userId: str
    deliveries: list[DeliveryHistory]


class Health(_Wire):
    status: str


class DependencyCheck(_Wire):
    status: Literal["OK", "KO"]
    error: str | None = Field(None, description="Why it is down")


class CheckUp(_Wire):
    """`GET /-/check-up`: each configured dependency (store, redis, files) and its state."""

    status: Literal["OK", "KO"]
    name: str
    version: str
    checks: dict[str, DependencyCheck]


# What each field of the request means, for the fields whose model gives no description.
_FIELD_DOCS = {
    "channels": "Channels to deliver on, each at most once",
    "recipients": "User ids; at least one of recipients/clusters is required",
    "clusters": "A user is selected when one of its clusters matches; at least one of recipients/clusters is required",
    "templateId": "A stored template (ObjectId hex or any string id); when given, messageTitle and "
    "messageContent are ignored",
    "messageTitle": "Without a template: e-mail subject and push title (required for email and push)",
    "messageContent": "Without a template: the body of every channel (required)",
    "data": "Free data available to templates as `data`",
    "emailAttachments": "File names fetched from the Files Service (merged with the template's)",
    "emailCarbonCopies": "Cc addresses",
    "emailBlindCarbonCopies": "Bcc addresses (envelope only)",
    "emailSender": "From of the e-mails of this request",
    "callbackUrl": "Where signed status callbacks go (Standard Webhooks); https, public addresses only unless the "
    "deployment allows otherwise ([callbacks].allow_http, allow_private); [callbacks].default_url otherwise",
    "callbackEvents": "Events to call back: job.finished (default), delivery.updated (batched)",
}

QUICK_START_REQUEST = {
    "channels": ["email", "sms", "push"],
    "clusters": ["beta"],
    "recipients": ["u43", "nobody"],
    "templateId": "65a000000000000000000001",
    "data": {"plan": "Pro", "start": "2026-12-01T09:00:00Z"},
}
QUICK_START_RESULT = {
    "failures": [{"channel": c, "error": "user not found", "userId": "nobody"} for c in ("email", "sms", "push")],
    "summary": {
        "users": 4,
        "sent": {"email": 3, "sms": 3, "push": 2},
        "skipped": {"email": 1, "sms": 1, "push": 2},
        "failed": {"email": 1, "sms": 1, "push": 1},
    },
    "id": "0c5a7e43f5c14b8a9b1f6d2e8a3c4b71",
}

_RESPONSE_MODELS = (
    SendResult,
    DryRunResult,
    DryRunSummary,
    SkippedDelivery,
    Failure,
    Summary,
    JobSummary,
    Error,
    JobAccepted,
    JobStatus,
    JobPage,
    FailuresPage,
    UserDeliveries,
    DeliveryHistory,
    Receipt,
    Health,
    Callback,
    CallbackPage,
    CheckUp,
    DependencyCheck,
)


def component_schemas(active_channels: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`components.schemas`: the request model in validation mode, the answers in serialization
    mode, `$ref`s pointing into `#/components/schemas`."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (SendRequest, "validation"),
        *((model, "serialization") for model in _RESPONSE_MODELS),
    ]
    _, top = models_json_schema(models, by_alias=True, ref_template=REF)
    schemas = copy.deepcopy(top["$defs"])
    request = schemas["SendRequest"]
    channels = request["properties"]["channels"]
    channels.setdefault("uniqueItems", True)
    channels["items"].setdefault("enum", list(active_channels if active_channels is not None else CHANNELS))
    for variant in request["properties"]["callbackEvents"].get("anyOf", []):
        if variant.get("type") == "array":
            variant.update(minItems=1, uniqueItems=True, items={"type": "string", "enum": list(CALLBACK_EVENTS)})
    for name, prop in request["properties"].items():
        prop.pop("title", None)
        if name in _FIELD_DOCS:
            prop.setdefault("description", _FIELD_DOCS[name])
    request.setdefault("description", "One message to many users over several channels. Unknown fields are ignored.")
    request["allOf"] = _cross_field_rules(channels["items"]["enum"])
    for schema in schemas.values():
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
    return schemas


def _cross_field_rules(channels: list[str]) -> list[dict[str, Any]]:
    """What `SendRequest._who_and_what` checks across fields, in JSON Schema, so that the document
    refuses what the service refuses: someone to send to, and without a template a non-blank
    content and, for the channels that need one, a title."""
    template = {"required": ["templateId"], "properties": {"templateId": {"type": "string"}}}
    titled = [c for c in channels if CHANNELS[c].needs_title]
    titled_rule = {
        "anyOf": [
            template,
            {"required": ["messageTitle"], "properties": {"messageTitle": {"type": "string"}}},
            {"properties": {"channels": {"not": {"contains": {"enum": titled}}}}},
        ]
    }
    return [
        {
            "anyOf": [
                {"required": ["recipients"], "properties": {"recipients": {"type": "array", "minItems": 1}}},
                {"required": ["clusters"], "properties": {"clusters": {"type": "array", "minItems": 1}}},
            ]
        },
        {
            "anyOf": [
                template,
                {
                    "required": ["messageContent"],
                    "properties": {"messageContent": {"type": "string", "pattern": r"\S"}},
                },
            ]
        },
        *([titled_rule] if titled else []),
    ]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(name: str, description: str, **extra: Any) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
        "content": {"application/json": {"schema": _ref(name)}},
    }
    response.update(extra)
    return response


def _error(description: str, **headers: Any) -> dict[str, Any]:
    response = _json("Error", description)
    response["headers"].update(headers)
    return response


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
        "content": {media_type: {"schema": {"type": "string"}}},
    }


_UNAUTHORIZED = _error(
    "No valid API key (only when API keys are configured)",
    **{"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
)
_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
_LOCATION = {"Location": {"description": "`/send/{id}`: the job", "schema": {"type": "string"}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation the service may have, keyed by (method, path)."""
    request_id = {"$ref": "#/components/parameters/RequestId"}
    return {
        ("post", "/send"): {
            "operationId": "send",
            "summary": "Deliver one message to many users over several channels",
            "description": "Synchronous by default: answers once every delivery was attempted. With "
            "`Prefer: respond-async` or `?async=true`, answers 202 at once with the job to poll.",
            "tags": ["send"],
            "parameters": [
                request_id,
                {
                    "name": "async",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                    "description": "Answer 202 at once and run the send as a job",
                },
                {
                    "name": "dryRun",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
                    "description": 'Validate, select and render (the first users), send and record nothing (also `"dryRun": true` in the body)',
                },
                {
                    "name": "Prefer",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "`respond-async`: same as `?async=true`",
                },
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": IDEMPOTENCY_KEY_MAX,
                        "pattern": IDEMPOTENCY_KEY_PATTERN,
                    },
                    "description": "The same key and body within the idempotency window answer the first "
                    "send's result or status; nothing is sent again. Another body: 422",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("SendRequest"), "example": QUICK_START_REQUEST}},
            },
            "responses": {
                "200": _json(
                    "SendResult",
                    "Every delivery was attempted; the failures and counts (a dry run: what would be sent)",
                    content={
                        "application/json": {
                            "schema": {"anyOf": [_ref("SendResult"), _ref("DryRunResult")]},
                            "example": QUICK_START_RESULT,
                        }
                    },
                    headers={"X-Request-ID": {"$ref": "#/components/headers/RequestId"}, **_LOCATION},
                ),
                "202": _json(
                    "JobAccepted",
                    "Accepted as a job: asynchronous mode (`{id, status}`), or a synchronous request "
                    "still running after `[server].sync_timeout_seconds` (the job as `GET /send/{id}` "
                    "shows it; the job goes on). `Location` names the job",
                    headers={"X-Request-ID": {"$ref": "#/components/headers/RequestId"}, **_LOCATION},
                    content={"application/json": {"schema": {"anyOf": [_ref("JobAccepted"), _ref("JobStatus")]}}},
                ),
                "400": _error("Invalid request; nothing was sent"),
                "401": _UNAUTHORIZED,
                "413": _error("Body larger than `[server].max_body_bytes`"),
                "422": _error("Idempotency-Key reused with another body"),
                "500": _error("A bug; logged with a traceback"),
                "502": _error("The Files Service is down"),
                "503": _error(
                    "Shutting down, or the store is unavailable. A send interrupted after it was accepted "
                    "also carries `id` (with `Location`), `failures` and `summary`: what was attempted; the "
                    "job resumes",
                    **_LOCATION,
                ),
            },
        },
        ("get", "/send"): {
            "operationId": "listJobs",
            "summary": "Jobs, newest first (with API keys: the key's own jobs; admin keys see all)",
            "tags": ["send"],
            "parameters": [
                request_id,
                _query("status", {"type": "string", "enum": list(get_args(JobState))}, "Only jobs in this state"),
                _query("channel", {"type": "string", "enum": list(CHANNELS)}, "Only jobs delivering on this channel"),
                _query("createdAfter", {"type": "string", "format": "date-time"}, "Created at or after"),
                _query("createdBefore", {"type": "string", "format": "date-time"}, "Created before"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"),
                _query("cursor", {"type": "string", "pattern": CURSOR_PATTERN}, "The `next` of the previous page"),
            ],
            "responses": {
                "200": _json("JobPage", "One page of jobs"),
                "400": _error("Invalid filter or cursor"),
                "401": _UNAUTHORIZED,
                "404": _error("Jobs are not recorded ([store].ledger = false)"),
                "503": _error("The store is unavailable"),
            },
        },
        ("get", "/send/{id}"): {
            "operationId": "getJob",
            "summary": "A job's state, counts and times",
            "tags": ["send"],
            "parameters": [_JOB_ID, request_id],
            "responses": {
                "200": _json("JobStatus", "The job"),
                "401": _UNAUTHORIZED,
                "404": _error("No such job, or one another API key created"),
                "503": _error("The store is unavailable"),
            },
        },
        ("delete", "/send/{id}"): {
            "operationId": "cancelJob",
            "summary": "Cancel a job (deliveries not started are not sent)",
            "tags": ["send"],
            "parameters": [_JOB_ID, request_id],
            "responses": {
                "200": _json("JobStatus", "The job after cancellation"),
                "401": _UNAUTHORIZED,
                "404": _error("No such job, or one another API key created"),
                "503": _error("The store is unavailable"),
            },
        },
        ("get", "/send/{id}/failures"): {
            "operationId": "getJobFailures",
            "summary": "A job's failures, paged",
            "tags": ["send"],
            "parameters": [
                _JOB_ID,
                request_id,
                {
                    "name": "after",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": "The `next` of the previous page",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            ],
            "responses": {
                "200": _json("FailuresPage", "One page of failures"),
                "400": _error("Invalid paging"),
                "401": _UNAUTHORIZED,
                "404": _error("No such job, or one another API key created"),
                "503": _error("The store is unavailable"),
            },
        },
        ("post", "/saga/send"): {
            "operationId": "sagaSend",
            "summary": "A Flow Manager command, mapped to a send by `[flow_manager].metadata_schema`",
            "description": "Answers 200 with an empty body once the send is accepted (it runs as a job); "
            "the outcome goes to the Flow Manager as the success or fail event. Idempotent per saga id "
            "(`key`) and `messageLabel`. 404 when no metadataSchema is configured.",
            "tags": ["send"],
            "parameters": [request_id],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["key", "value"],
                            "properties": {
                                "key": {"type": "string", "minLength": 1, "description": "The saga id"},
                                "value": {
                                    "type": "object",
                                    "required": ["messageLabel"],
                                    "properties": {
                                        "messageLabel": {"type": "string", "minLength": 1},
                                        "messagePayload": {"type": "object"},
                                    },
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "Accepted: sending started",
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
                },
                "400": _error("Not a command, or the mapped send is invalid (the fail event follows)"),
                "401": _UNAUTHORIZED,
                "404": _error("No metadataSchema is configured"),
                "413": _error("Body larger than `[server].max_body_bytes`"),
                "422": _error("The same saga id and label came with another command"),
                "500": _error("A bug; logged with a traceback"),
                "502": _error("The Files Service is down"),
                "503": _error("Shutting down, or the store is unavailable"),
            },
        },
        ("get", "/callbacks"): {
            "operationId": "listCallbacks",
            "summary": "Callbacks in a state, newest first (default: dead letters); a key sees its own",
            "tags": ["callbacks"],
            "parameters": [
                request_id,
                _query(
                    "state", {"type": "string", "enum": ["pending", "delivered", "dead"], "default": "dead"}, "State"
                ),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, "Page size"),
                _query("cursor", {"type": "string"}, "The `next` of the previous page"),
            ],
            "responses": {
                "200": _json("CallbackPage", "One page of callbacks"),
                "400": _error("Invalid state, limit or cursor"),
                "401": _UNAUTHORIZED,
                "404": _error("Callbacks need the delivery ledger"),
                "503": _error("The store is unavailable"),
            },
        },
        ("post", "/callbacks/{id}/retry"): {
            "operationId": "retryCallback",
            "summary": "Try a dead callback again (same webhook-id, fresh retry schedule)",
            "tags": ["callbacks"],
            "parameters": [_JOB_ID, request_id],
            "responses": {
                "200": _json("Callback", "The callback, pending again"),
                "400": _error("The callback is not dead"),
                "401": _UNAUTHORIZED,
                "404": _error("No such callback, or one another API key's job made"),
                "503": _error("The store is unavailable"),
            },
        },
        ("get", "/send/{id}/deliveries"): {
            "operationId": "getUserDeliveries",
            "summary": "One user's deliveries in a job, with their history",
            "tags": ["send"],
            "parameters": [
                _JOB_ID,
                request_id,
                {"name": "userId", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1}},
            ],
            "responses": {
                "200": _json("UserDeliveries", "The user's deliveries (none if the job never reached the user)"),
                "400": _error("No userId"),
                "401": _UNAUTHORIZED,
                "404": _error("No such job"),
                "503": _error("The store is unavailable"),
            },
        },
        ("post", "/providers/twilio/status"): {
            "operationId": "twilioStatusCallback",
            "summary": "Twilio's status callbacks (receipts); authenticated by X-Twilio-Signature, not API keys",
            "tags": ["providers"],
            "parameters": [
                request_id,
                {"name": "X-Twilio-Signature", "in": "header", "required": True, "schema": {"type": "string"}},
                {
                    "name": "d",
                    "in": "query",
                    "required": False,
                    "description": "The delivery the receipt is for, as the service put it in the StatusCallback URL",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
            },
            "responses": {
                "204": {"description": "Taken (applied, kept for later, or a status that changes nothing)"},
                "400": _error("A signed callback that names no message or call"),
                "403": _error("Missing or wrong signature; nothing changed"),
                "404": _error("Receipts are off ([providers.twilio].status_callback_base_url is empty)"),
                "503": _error("The store is unavailable"),
            },
        },
        ("get", "/-/healthz"): {
            "operationId": "healthz",
            "summary": "Liveness: 200 while the process serves; 503 once the embedded store it started "
            "has been down for more than 10 s",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {"200": _json("Health", "Alive"), "503": _error("Not alive: restart the service")},
        },
        ("get", "/-/ready"): {
            "operationId": "ready",
            "summary": "Readiness: 200 when the store answers a ping (and Redis in cluster mode) and the "
            "outbox directory, when a channel uses it, can be written",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {"200": _json("Health", "Ready"), "503": _error("Not ready: the message names what is down")},
        },
        ("get", "/-/check-up"): {
            "operationId": "checkUp",
            "summary": "The state of each dependency: the store, Redis (cluster mode), the Files Service",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {
                "200": _json("CheckUp", "Every dependency is up"),
                "503": {
                    "description": "A dependency is down: the error shape, with `status` and `checks`",
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
                    "content": {"application/json": {"schema": {"allOf": [_ref("Error"), _ref("CheckUp")]}}},
                },
            },
        },
        ("get", "/-/metrics"): {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format)",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {"200": _text("text/plain", "The metrics"), "401": _UNAUTHORIZED},
        },
        ("get", "/-/openapi.json"): {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        },
        ("get", "/-/docs"): {
            "operationId": "docs",
            "summary": "This document, browsable",
            "tags": ["operations"],
            "parameters": [request_id],
            "responses": {"200": _text("text/html", "An HTML page")},
        },
    }


def known_operations() -> set[tuple[str, str]]:
    return set(_operations())


def build_openapi(
    *,
    routes: set[tuple[str, str]] | None = None,
    active_channels: tuple[str, ...] | None = None,
    auth_enabled: bool = False,
    protect_metrics: bool = False,
    version: str | None = None,
) -> dict[str, Any]:
    """The document, limited to `routes` ((method, path) pairs, lower-case method, `{param}`
    paths) when given."""
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in _operations().items():
        if routes is not None and (method, path) not in routes:
            continue
        operation = copy.deepcopy(operation)
        protected = is_protected(path, protect_metrics)
        if auth_enabled and protected:
            operation["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
        else:
            operation["responses"].pop("401", None)
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trio-dispatcher",
            "version": version or _version(),
            "description": "Multi-channel messaging service: one request, many users, e-mail, SMS, push and "
            "voice. Every error is JSON `{statusCode, error, message}`.",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "paths": paths,
        "components": {
            "schemas": component_schemas(active_channels),
            "parameters": {
                "RequestId": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Reused when 1-128 of `[A-Za-z0-9._-]`, replaced by a new one otherwise (any "
                    "value is accepted); echoed in the answer",
                    "schema": {"type": "string"},
                }
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id, on every log line it caused",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trio-dispatcher")
    except PackageNotFoundError:
        return "0.0.0"


def route_template(rule: str) -> str:
    """Werkzeug's `/send/<id>` or `/send/<string:id>` as OpenAPI's `/send/{id}`."""
    out, rest = [], rule
    while "<" in rest:
        head, _, tail = rest.partition("<")
        inner, _, rest = tail.partition(">")
        out.append(head + "{" + inner.rpartition(":")[2] + "}")
    out.append(rest)
    return "".join(out)


def app_routes(app: Any) -> set[tuple[str, str]]:
    """The (method, path) pairs an app serves, without the static route and automatic methods."""
    routes = set()
    for rule in app.url_map.iter_rules():
        # The operations page (dispatcher/ui) is for browsers, not part of the API.
        if rule.endpoint == "static" or rule.endpoint.startswith("ui."):
            continue
        for method in rule.methods or ():
            if method in ("HEAD", "OPTIONS"):
                continue
            routes.add((method.lower(), route_template(rule.rule)))
    return routes


def openapi_for(app: Any, settings: Any, auth_enabled: bool) -> dict[str, Any]:
    return build_openapi(
        routes=app_routes(app),
        active_channels=tuple(settings.channels.active),
        auth_enabled=auth_enabled,
        protect_metrics=settings.auth.protect_metrics,
    )


DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} API</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }}
h2 {{ border-bottom: 1px solid #ccc; }}
code, pre {{ font-family: ui-monospace, monospace; }}
pre {{ background: #f6f6f6; padding: .6rem; overflow-x: auto; font-size: .85rem; }}
.method {{ display: inline-block; min-width: 4.5rem; font-weight: bold; text-transform: uppercase; }}
details {{ margin: .4rem 0 .8rem; }}
</style>
</head>
<body>
<h1>{title} API</h1>
<p>The OpenAPI 3.1 document is <a href="{spec}">{spec}</a>; load it in any OpenAPI viewer or client
generator. This page lists its operations and schemas.</p>
<div id="operations"><p>Loading <code>{spec}</code>&hellip;</p></div>
<h2>Schemas</h2>
<div id="schemas"></div>
<script>
(function () {{
  function el(tag, text) {{ var e = document.createElement(tag); if (text) e.textContent = text; return e; }}
  function block(summary, value) {{
    var d = el("details"); d.appendChild(el("summary", summary));
    d.appendChild(el("pre", JSON.stringify(value, null, 2))); return d;
  }}
  fetch("{spec}").then(function (r) {{ return r.json(); }}).then(function (doc) {{
    var ops = document.getElementById("operations"); ops.textContent = "";
    Object.keys(doc.paths).forEach(function (path) {{
      Object.keys(doc.paths[path]).forEach(function (method) {{
        var op = doc.paths[path][method], h = el("h2");
        var m = el("span", method); m.className = "method"; h.appendChild(m);
        h.appendChild(el("code", path)); ops.appendChild(h);
        if (op.summary) ops.appendChild(el("p", op.summary));
        if (op.description) ops.appendChild(el("p", op.description));
        if (op.parameters) ops.appendChild(block("Parameters", op.parameters));
        if (op.requestBody) ops.appendChild(block("Request body", op.requestBody));
        ops.appendChild(block("Responses: " + Object.keys(op.responses).join(", "), op.responses));
      }});
    }});
    var schemas = document.getElementById("schemas");
    Object.keys(doc.components.schemas).forEach(function (name) {{
      schemas.appendChild(block(name, doc.components.schemas[name]));
    }});
  }}).catch(function (err) {{
    document.getElementById("operations").textContent = "Could not load {spec}: " + err;
  }});
}})();
</script>
<noscript><p>Without JavaScript, read <a href="{spec}">{spec}</a> directly.</p></noscript>
</body>
</html>
"""


def docs_page(spec_url: str = "/-/openapi.json", title: str = "trio-dispatcher") -> str:
    return DOCS_HTML.format(spec=html.escape(spec_url, quote=True), title=html.escape(title))


__all__ = [
    "Error",
    "Failure",
    "FailuresPage",
    "Callback",
    "CallbackPage",
    "JobAccepted",
    "JobPage",
    "JobStatus",
    "SendResult",
    "Summary",
    "app_routes",
    "build_openapi",
    "docs_page",
    "known_operations",
    "openapi_for",
    "route_template",
]
