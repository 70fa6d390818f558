"""Fake providers on 127.0.0.1 (Twilio, FCM and its token endpoint, the Files Service, SMTP).

They check what they receive (auth, paths, bodies), record it, and answer according to a
`Faults` plan: scripted outcomes for tests, or latency and error rates for the load-test harness.
They ship with the package because `dispatcher loadtest` drives them.
"""

from .faults import Faults, Outcome
from .server import serve_asgi

__all__ = ["Faults", "Outcome", "serve_asgi"]
