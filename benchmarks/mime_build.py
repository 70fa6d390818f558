"""CPU per e-mail of `dispatcher.mime.build_email` + serialization, next to the previous build
(`EmailMessage`, `policy.default`, copied below) on the same personalised messages.

Two serializations: `as_bytes()` (what the outbox writes) and the SMTP provider's wire form
(smtpproto asks for `policy.SMTP`; the provider now answers with compat32 and CRLF, see
`providers/smtp.py::_Wire`; the previous build went through `policy.SMTP` itself).

    python benchmarks/mime_build.py [N]
"""

import email.utils
import sys
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage

from dispatcher.messages import EmailContent, EmailOptions
from dispatcher.mime import build_email
from dispatcher.providers.smtp import _Wire

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
SENDER = "Example Shop <shop@example.com>"
TEXT = (
    "Hello {name},\n\nyour order #{n} has shipped and should arrive on Friday.\n"
    "Track it at https://shop.example.com/orders/{n}.\n\nThanks for shopping with us,\nExample Shop\n"
)
HTML = (
    "<p>Hello <b>{name}</b>,</p><p>your order #{n} has shipped and should arrive on Friday.</p>"
    '<p><a href="https://shop.example.com/orders/{n}">Track it</a>.</p><p>Thanks, Example Shop</p>\n'
)
TEXT_FR = (
    "Bonjour {name},\n\nvotre commande n°{n} est expédiée ; livraison prévue vendredi.\n\nÀ bientôt,\nLa Boutique\n"
)


def previous_build(content: EmailContent, to: str) -> EmailMessage:
    """The previous build (EmailMessage, policy.default), as `dispatcher/mime.py` had it."""
    msg = EmailMessage()
    options = content.options
    msg["Subject"] = content.subject
    msg["From"] = options.sender
    msg["To"] = to
    if options.cc:
        msg["Cc"] = ", ".join(options.cc)
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    domain = options.sender.rpartition("@")[2] or "localhost"
    msg["Message-ID"] = email.utils.make_msgid(domain=domain)
    if content.text is not None:
        msg.set_content(content.text)
        if content.html is not None:
            msg.add_alternative(content.html, subtype="html")
    else:
        msg.set_content(content.html or "", subtype="html")
    return msg


def variants(n: int) -> dict[str, EmailContent]:
    name, options = f"Ada{n}", EmailOptions(sender=SENDER)
    return {
        "text": EmailContent(f"Your order #{n} has shipped, {name}", TEXT.format(name=name, n=n), None, options),
        "text+html": EmailContent(
            f"Your order #{n} has shipped, {name}", TEXT.format(name=name, n=n), HTML.format(name=name, n=n), options
        ),
        "text+html, non-ASCII": EmailContent(
            f"Votre commande n°{n} est expédiée, Adèle",
            TEXT_FR.format(name="Adèle", n=n),
            HTML.format(name="Adèle", n=n),
            EmailOptions(sender='"La Boutique Été" <shop@example.com>'),
        ),
    }


def cpu_us(variant: str, run: Callable[[EmailContent, str], bytes], count: int = N) -> float:
    contents = [(variants(n)[variant], f"user{n}@example.com") for n in range(count)]
    started = time.process_time()
    for content, to in contents:
        run(content, to)
    return (time.process_time() - started) / count * 1e6


RUNS: dict[str, Callable[[EmailContent, str], bytes]] = {
    "previous build (EmailMessage, policy.default) + as_bytes()": lambda c, to: previous_build(c, to).as_bytes(),
    "previous build (EmailMessage, policy.default) + SMTP wire (policy.SMTP)": lambda c, to: previous_build(
        c, to
    ).as_bytes(policy=policy.SMTP),
    "build_email (email.mime, compat32) + as_bytes()": lambda c, to: build_email(c, to).as_bytes(),
    "build_email (email.mime, compat32) + SMTP wire (_Wire)": lambda c, to: _Wire(build_email(c, to)).as_bytes(
        policy=policy.SMTP
    ),
}

if __name__ == "__main__":
    print(f"CPU µs per message (time.process_time, N = {N}, Python {sys.version.split()[0]})")
    for variant in variants(0):
        print(f"\n{variant}:")
        for label, run in RUNS.items():
            cpu_us(variant, run, 50)  # warm-up
            print(f"  {cpu_us(variant, run):7.0f} µs  {label}")
