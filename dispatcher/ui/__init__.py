"""The operations page: `GET /-/ui` (`[ui].prefix`; off with `[ui].enabled = false`).

Rendered on the server (Jinja2, autoescaped) from the dispatcher's own API and ledger, with one
small hand-written script for what needs it: live progress (polling a small JSON route every
`[ui].poll_seconds` while the page is visible), the API key, and the Cancel and Retry buttons,
which call the HTTP API itself (`DELETE /send/{id}`), so the page can do nothing the key could
not do with curl. Nothing is fetched from elsewhere: no CDN, no fonts, and a Content-Security-Policy
that allows only the page's own files. Every link is relative, so the page works behind a proxy
that serves the service under a path prefix.

With API keys on, the page asks for a key once and keeps it in the browser's session storage; the
script sends it as `X-API-Key` on every request it makes. A key never goes in a URL (so never in an
access log, a proxy's log or the browser's history): without a key every page answers 401 with the
prompt, and the script loads the asked page again with the header and shows it.
"""

from __future__ import annotations

from .routes import install_ui

__all__ = ["install_ui"]
