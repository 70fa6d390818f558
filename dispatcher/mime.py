"""Building e-mails with the stdlib `email` package (shared by the SMTP and outbox providers)."""

from __future__ import annotations

import email.utils
from email.message import EmailMessage

from .messages import EmailContent


def build_email(content: EmailContent, to: str) -> EmailMessage:
    """A complete message for `to`: Bcc stays out of the headers (it travels in the envelope)."""
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
    for attachment in options.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        if not subtype:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename)
    return msg


def envelope_recipients(content: EmailContent, to: str) -> list[str]:
    return [to, *content.options.cc, *content.options.bcc]
