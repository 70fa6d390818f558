"""The JSON of the dispatcher's answers: a send's `SendResult`, the answers about jobs
(`job_views.py`) and callbacks (`callback_views.py`), and a dry run's `DryRun` (`dryrun.py`), in
the camelCase shapes the OpenAPI document (`openapi.py`) describes.

The HTTP layer answers with these, and the `job.finished` callback carries `job_json` of the
finished job: the same body as `GET /send/{id}`, from the same function. (A `Summary`'s own
`to_json` is the plain form of the counts, which the ledger stores too.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from .callback_views import Callback, CallbackPage
from .dryrun import DryRun, Skipped
from .job_views import DeliveryRecord, FailurePage, JobPage, JobStatus, UserDeliveries
from .listing import iso_ms
from .messages import EmailContent, Message, PushContent, TextContent
from .models import Failure, SendResult


def failure_json(failure: Failure) -> dict[str, str]:
    return {"userId": failure.user_id, "channel": failure.channel, "error": failure.error}


def send_result_json(result: SendResult) -> dict[str, Any]:
    """`POST /send`: the predecessor's shape, and the job's id after its fields (old clients
    ignore it; there is none without the ledger)."""
    body: dict[str, Any] = {"failures": [failure_json(f) for f in result.failures], "summary": result.summary.to_json()}
    if result.job_id is not None:
        body["id"] = result.job_id
    return body


def summary_json(job: JobStatus) -> dict[str, Any]:
    """The send's counts, then, where they were counted, the receipts'."""
    body = job.summary.to_json()
    if job.receipts is not None:
        body.update(
            delivered=job.receipts.delivered, undelivered=job.receipts.undelivered, unconfirmed=job.receipts.unconfirmed
        )
    return body


def job_json(job: JobStatus) -> dict[str, Any]:
    """`GET /send/{id}`, `DELETE /send/{id}`, a job of the listing, the `job.finished` data."""
    return {
        "id": job.id,
        "status": job.state,
        "createdAt": job.created_at,
        "startedAt": job.started_at,
        "finishedAt": job.finished_at,
        "summary": summary_json(job),
        "error": job.error,
        "requestId": job.request_id,
        "channels": list(job.channels),
    }


def job_page_json(page: JobPage) -> dict[str, Any]:
    """`GET /send`."""
    return {"jobs": [job_json(job) for job in page.jobs], "next": page.next}


def failure_page_json(page: FailurePage) -> dict[str, Any]:
    """`GET /send/{id}/failures`."""
    return {"id": page.job_id, "failures": [failure_json(failure) for failure in page.failures], "next": page.next}


def delivery_json(delivery: DeliveryRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "channel": delivery.channel,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "providerId": delivery.provider_id,
        "error": delivery.error,
        "claimedAt": _time(delivery.claimed_at),
        "settledAt": _time(delivery.settled_at),
        "receiptAt": _time(delivery.receipt_at),
        "receipts": [
            {"status": r.status, "state": r.state, "code": r.code, "at": _time(r.at)} for r in delivery.receipts
        ],
    }
    if delivery.failure is not None:
        body["failure"] = delivery.failure
    if delivery.reconciled is not None:
        body["reconciled"] = delivery.reconciled
    return body


def _time(moment: dt.datetime | None) -> str | None:
    return iso_ms(moment) if moment is not None else None


def deliveries_json(deliveries: UserDeliveries) -> dict[str, Any]:
    """`GET /send/{id}/deliveries?userId=`."""
    return {
        "id": deliveries.job_id,
        "userId": deliveries.user_id,
        "deliveries": [delivery_json(delivery) for delivery in deliveries.deliveries],
    }


def callback_json(callback: Callback) -> dict[str, Any]:
    """`POST /callbacks/{id}/retry`, a callback of the listing."""
    return {
        "id": callback.id,
        "type": callback.type,
        "jobId": callback.job_id,
        "requestId": callback.request_id,
        "url": callback.url,
        "state": callback.state,
        "events": callback.events,
        "attempts": callback.attempts,
        "createdAt": iso_ms(callback.created_at),
        "nextAttemptAt": _time(callback.next_attempt_at),
        "lastError": callback.last_error,
    }


def callback_page_json(page: CallbackPage) -> dict[str, Any]:
    """`GET /callbacks`."""
    return {"callbacks": [callback_json(callback) for callback in page.callbacks], "next": page.next}


def preview_json(message: Message) -> dict[str, Any]:
    """A rendered message of a dry run: what its provider would be handed."""
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


def skipped_json(skipped: Skipped) -> dict[str, str]:
    return {"userId": skipped.user_id, "channel": skipped.channel, "reason": skipped.reason}


def dry_run_json(run: DryRun) -> dict[str, Any]:
    """`POST /send?dryRun=true`, and what `dispatcher render` prints."""
    counts = run.summary
    return {
        "dryRun": True,
        "previews": [preview_json(message) for message in run.previews],
        "skipped": [skipped_json(skipped) for skipped in run.skipped],
        "failures": [failure_json(failure) for failure in run.failures],
        "summary": {
            "users": counts.users,
            "selected": counts.selected,
            "skipped": counts.skipped,
            "failed": counts.failed,
        },
    }


__all__ = [
    "callback_json",
    "callback_page_json",
    "deliveries_json",
    "delivery_json",
    "dry_run_json",
    "failure_json",
    "failure_page_json",
    "job_json",
    "job_page_json",
    "preview_json",
    "send_result_json",
    "skipped_json",
    "summary_json",
]
