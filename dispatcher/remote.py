"""`dispatcher jobs …` and `dispatcher callbacks …`: the service's HTTP API from the command line.

They talk to a running service (`--url`, else `DISPATCHER_URL`, else http://127.0.0.1:3000)
with the key in `DISPATCHER_API_KEY` (never on the command line, where `ps` shows it), so they
see exactly what that key sees. Tables by default, the API's JSON with `--json`. Exit status 0 on
success, 1 when the service answers an error (its message is printed), 2 when it cannot be
reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:3000"
KEY_ENV = "DISPATCHER_API_KEY"
URL_ENV = "DISPATCHER_URL"


class ApiFailed(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_parsers(commands: Any, command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register `jobs` and `callbacks` on the main parser (`command` adds one subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the service (default ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    jobs = command("jobs", "list, show, page the failures of and cancel jobs over the HTTP API")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="jobs, newest first (the key's own; an admin key sees all)"
    )
    listing.add_argument("--status", choices=("queued", "running", "done", "failed", "cancelled"))
    listing.add_argument("--channel")
    listing.add_argument("--created-after", metavar="ISO8601")
    listing.add_argument("--created-before", metavar="ISO8601")
    listing.add_argument("--limit", type=int, default=50, help="page size (1-200, default 50)")
    listing.add_argument("--cursor", help="`next` of a previous page")
    listing.add_argument("--all", action="store_true", help="follow the cursor to the last page")
    for name, summary in (
        ("show", "one job: state, counts, times"),
        ("failures", "every failure of a job"),
        ("cancel", "cancel a job"),
    ):
        actions.add_parser(name, parents=[common], help=summary).add_argument("id")
    callbacks = command("callbacks", "list and retry callbacks (dead letters) over the HTTP API")
    actions = callbacks.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="callbacks in a state (default: dead)")
    listing.add_argument("--state", default="dead", choices=("pending", "delivered", "dead"))
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor")
    actions.add_parser("retry", parents=[common], help="deliver a dead callback again").add_argument("id")


def run(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    headers = {"Accept": "application/json"}
    key = os.environ.get(KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout, follow_redirects=False) as http:
            api = _Api(http)
            if args.command == "jobs":
                _jobs(api, args, out)
            else:
                _callbacks(api, args, out)
    except ApiFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    return 0


class _Api:
    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    def call(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, params={k: v for k, v in (params or {}).items() if v})
        except httpx.HTTPError as exc:
            raise ApiFailed(f"cannot reach {self._http.base_url}: {exc}", status=2) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            message = body.get("message") if isinstance(body, dict) else response.text[:200]
            raise ApiFailed(f"{method} {path}: {response.status_code} {message}")
        return body


def _jobs(api: _Api, args: argparse.Namespace, out: Any) -> None:
    if args.action == "list":
        params = {
            "status": args.status,
            "channel": args.channel,
            "createdAfter": args.created_after,
            "createdBefore": args.created_before,
            "limit": args.limit,
            "cursor": args.cursor,
        }
        pages = _pages(api, "/send", params, "jobs", follow=args.all)
        if args.json:
            for page in pages:
                _print_json(page, out)
            return
        rows = [
            (
                job["id"],
                job["status"],
                job.get("createdAt") or "",
                _counts(job.get("summary") or {}, "sent"),
                _counts(job.get("summary") or {}, "failed"),
                job.get("requestId") or "",
            )
            for page in pages
            for job in page["jobs"]
        ]
        _table(("ID", "STATUS", "CREATED", "SENT", "FAILED", "REQUEST"), rows, out)
        return
    path = f"/send/{quote(args.id, safe='')}"
    if args.action == "show":
        _print_json(api.call("GET", path), out)
    elif args.action == "cancel":
        _print_json(api.call("DELETE", path), out)
    elif args.action == "failures":
        after = None
        failures: list[dict[str, Any]] = []
        while True:
            page = api.call("GET", f"{path}/failures", {"limit": 1000, "after": after})
            failures.extend(page["failures"])
            after = page.get("next")
            if after is None:
                break
        if args.json:
            _print_json({"id": args.id, "failures": failures}, out)
        else:
            _table(("USER", "CHANNEL", "ERROR"), [(f["userId"], f["channel"], f["error"]) for f in failures], out)


def _callbacks(api: _Api, args: argparse.Namespace, out: Any) -> None:
    if args.action == "retry":
        _print_json(api.call("POST", f"/callbacks/{quote(args.id, safe='')}/retry"), out)
        return
    page = api.call("GET", "/callbacks", {"state": args.state, "limit": args.limit, "cursor": args.cursor})
    if args.json:
        _print_json(page, out)
        return
    rows = [
        (c["id"], c["type"], c["jobId"] or "", c["state"], str(c["attempts"]), c.get("lastError") or "")
        for c in page["callbacks"]
    ]
    _table(("ID", "TYPE", "JOB", "STATE", "ATTEMPTS", "LAST ERROR"), rows, out)
    if page.get("next"):
        print(f"(more: --cursor {page['next']})", file=out)


def _pages(api: _Api, path: str, params: dict[str, Any], field: str, *, follow: bool) -> list[dict[str, Any]]:
    pages = []
    while True:
        page = api.call("GET", path, params)
        pages.append(page)
        if not follow or not page.get("next"):
            return pages
        params = {**params, "cursor": page["next"]}


def _counts(summary: dict[str, Any], state: str) -> str:
    return ",".join(f"{channel}={n}" for channel, n in (summary.get(state) or {}).items()) or "-"


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]], out: Any) -> None:
    rows = [header, *rows]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)


def _print_json(body: Any, out: Any) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False), file=out)


__all__ = ["add_parsers", "run"]
