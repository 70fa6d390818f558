"""Building e-mails with the stdlib `email` package (shared by the SMTP and outbox providers).

The legacy API (`email.mime`, a compat32 policy, headers as ready-encoded strings) rather than
`EmailMessage` with `policy.default`: there every header assignment runs the header registry's
full RFC 5322 parser and writing the message parses and refolds every header again, which a
profile put at ~15% of the service's CPU. `benchmarks/mime_build.py` (build + serialization of a
personalised message) measures ~1.5 ms of CPU for a text message that way and ~0.12 ms this way,
~2.5 ms and ~0.25 ms with an HTML alternative. The SMTP provider writes the message with this
module's policy too (`providers/smtp.py::_Wire`), not with smtpproto's `EmailPolicy`.

A compat32 message checks nothing, so what the modern API did for free is done here:
- a header value is kept to one line: a line break in it would start a header of its own;
- each header is encoded (RFC 2047 words, RFC 2231 file names) and folded where it is set;
- a body is 7bit only when it is ASCII with lines of at most 998 characters (RFC 5322 2.1.1),
  otherwise quoted-printable, so the message passes any server, 8BITMIME or not.
"""

from __future__ import annotations

import email.policy
import re
import secrets
import sys
from email import encoders
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from typing import Any

from .messages import Attachment, EmailContent


class _Policy(Compat32):
    """compat32, writing a header that is one ASCII line short enough not to be folded as it is.

    compat32 re-encodes every header through `Header` on the way out (half the cost of writing a
    message), which gives such a line back unchanged.
    """

    def fold_binary(self, name: str, value: Any) -> bytes:
        if (
            isinstance(value, str)
            and value.isascii()
            and value.splitlines() == [value]
            and len(name) + 2 + len(value) <= (self.max_line_length or sys.maxsize)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


# The messages' own policy, so `as_bytes()` uses it; the SMTP provider clones it with CRLF.
POLICY = _Policy()
# utf-8 with quoted-printable bodies (headers keep its shortest encoding). Its own instance:
# changing the registry's "utf-8" entry would change it for the whole process.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP
_LONG_LINE = re.compile(r"[^\r\n]{999}")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
# base64 is not allowed for multipart/* and message/* (RFC 2045 6.4): those go as octet-stream.
_ATTACHMENT_TYPE = re.compile(rf"(?!multipart/|message/){_TOKEN}/{_TOKEN}", re.IGNORECASE)


def build_email(content: EmailContent, to: str) -> Message:
    """A complete message for `to`: Bcc stays out of the headers (it travels in the envelope)."""
    options = content.options
    mail = _body(content.text, content.html)
    if options.attachments:
        parts = [mail, *map(_attachment, options.attachments)]
        mail = MIMEMultipart("mixed", _boundary(), parts, policy=POLICY)
    author, sender = _mailbox(options.sender)
    mail["Subject"] = _subject(_one_line(content.subject))
    mail["From"] = author
    mail["To"] = _one_line(to)
    if options.cc:
        mail["Cc"] = _folded("Cc", ", ".join(_mailbox(cc)[0] for cc in options.cc))
    mail["Date"] = formatdate(usegmt=True)
    mail["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    return mail


def envelope_recipients(content: EmailContent, to: str) -> list[str]:
    return [to, *content.options.cc, *content.options.bcc]


def _body(text: str | None, html: str | None) -> Message:
    if text is not None and html is not None:
        return MIMEMultipart("alternative", _boundary(), [_text(text, "plain"), _text(html, "html")], policy=POLICY)
    return _text(text, "plain") if text is not None else _text(html or "", "html")


def _text(body: str, subtype: str) -> MIMEText:
    plain = body.isascii() and "\0" not in body and not _LONG_LINE.search(body)
    # typeshed lists only `str` for the charset; MIMEText passes it to `set_payload`, which takes a Charset.
    return MIMEText(body, subtype, "us-ascii" if plain else _UTF8, policy=POLICY)  # type: ignore[arg-type]


def _attachment(attachment: Attachment) -> MIMEBase:
    content_type = attachment.content_type
    if not _ATTACHMENT_TYPE.fullmatch(content_type):
        content_type = "application/octet-stream"
    part = MIMEBase(*content_type.lower().split("/"), policy=POLICY)
    part.set_payload(attachment.content)
    encoders.encode_base64(part)
    name = _one_line(attachment.filename)
    part.add_header("Content-Disposition", "attachment", filename=name if name.isascii() else ("utf-8", "", name))
    disposition = part["Content-Disposition"]
    if len("Content-Disposition: ") + len(disposition) > 78:
        # compat32 cannot split a parameter (RFC 2231 filename*0*=, *1*=...): a long name would
        # make a line of any length. The modern folder can, and only this rare header pays for it.
        folded = email.policy.default.fold("Content-Disposition", disposition)
        part.replace_header("Content-Disposition", folded.partition(": ")[2].rstrip("\n"))
    return part


def _subject(subject: str) -> str:
    # `Header` splits into encoded-words and folds, but costs ~130 µs where one word costs ~10:
    # most subjects fit on the line (and in the 75 characters of an encoded-word) without it.
    short = subject if subject.isascii() else _UTF8.header_encode(subject)
    return short if len("Subject: ") + len(short) <= 78 else Header(subject, header_name="Subject").encode()


def _mailbox(value: str) -> tuple[str, str]:
    """`Name <address>` with the name encoded when it is not ASCII, and the address alone."""
    value = _one_line(value)
    name, address = parseaddr(value)
    if not name or not address:
        return address or value, address
    if address.isascii():
        return formataddr((name, address), charset="utf-8"), address
    # formataddr refuses an SMTPUTF8 address (the SMTP provider announces SMTPUTF8 for it).
    return f"{_UTF8.header_encode(name)} <{address}>", address


def _folded(name: str, value: str) -> str:
    return value if len(name) + 2 + len(value) <= 78 else Header(value, header_name=name).encode()


def _one_line(value: str) -> str:
    # Every boundary str.splitlines knows: compat32's `Header` and EmailPolicy both split on them.
    return " ".join(value.splitlines())


def _boundary() -> str:
    # Set up front, or the generator picks one and stores it through the policy it writes with.
    # "=_" cannot occur in quoted-printable or base64 text; 128 random bits keep the line short.
    return f"=_{secrets.token_urlsafe(16)}"
