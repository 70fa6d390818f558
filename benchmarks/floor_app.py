"""The floor of one single-recipient send, as a service: what any implementation must do for it,
and nothing else. Run by `benchmarks/floor.py` with the harness's generated configuration, on the
same store, fakes and load generator as the real service:

- Quart-Trio on hypercorn answering a JSON POST (the framework);
- one `find_one` of the user through `trio.to_thread` (pymongo, the same store);
- the message built with a `str.replace` (a plain-path template costs no more than that);
- the project's own provider for the channel (SMTP, Twilio or FCM code path, the same fakes);
- with `--ledger`: the two writes a durable send cannot avoid, a claim before the provider call
  and its outcome after, each its own round trip (unbatched: batching is an optimisation the real
  service may make, not a floor).

    python benchmarks/floor_app.py CONFIG.toml PORT [--ledger]
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from pymongo import MongoClient
from quart import request
from quart_trio import QuartTrio

from dispatcher.messages import EmailContent, EmailOptions, Message, PushContent, TextContent
from dispatcher.providers import open_providers
from dispatcher.settings import load_settings


def main() -> None:
    config_path, port, ledger = sys.argv[1], int(sys.argv[2]), "--ledger" in sys.argv[3:]
    settings = load_settings(config_path)
    client: MongoClient[dict[str, Any]] = MongoClient(settings.store.url.get_secret_value())
    db = client[settings.store.database]
    users = db[settings.store.users_collection]
    deliveries = db["floor_deliveries"]
    fields = settings.user_fields
    app = QuartTrio("floor")
    providers: dict[str, Any] = {}

    def address_of(user: dict[str, Any], channel: str) -> tuple[str, ...]:
        name = {"email": fields.email_address, "push": fields.device_token}.get(channel, fields.phone_number)
        value = user.get(name)
        return tuple(value) if isinstance(value, list) else (value,) if value else ()

    def content(channel: str, body: dict[str, Any], user: dict[str, Any]) -> Any:
        text = body["messageContent"].replace("{{ user.name }}", user.get("name", "")).replace("{{ data.code }}", "x")
        if channel == "email":
            return EmailContent(body["messageTitle"], text, None, EmailOptions(settings.sender.email or "floor@x"))
        if channel == "push":
            return PushContent(body["messageTitle"], None, text)
        return TextContent(text, settings.sender.sms or "+15550000000")

    @app.get("/-/ready")
    async def ready() -> Any:
        return {"ok": True}

    @app.post("/send")
    async def send() -> Any:
        body = await request.get_json()
        channel, user_id = body["channels"][0], body["recipients"][0]
        user = await trio.to_thread.run_sync(users.find_one, {"_id": user_id})
        addresses = address_of(user, channel)
        if not addresses:
            return {"failures": [], "summary": {"users": 1, "sent": {}, "skipped": {channel: 1}, "failed": {}}}
        message = Message(channel, user_id, addresses, content(channel, body, user))
        key = uuid.uuid4().hex
        if ledger:
            await trio.to_thread.run_sync(deliveries.insert_one, {"_id": key, "state": "sending"})
        ids = [await providers[channel].send(message, address) for address in addresses]
        if ledger:
            await trio.to_thread.run_sync(deliveries.update_one, {"_id": key}, {"$set": {"state": "sent", "ids": ids}})
        return {"failures": [], "summary": {"users": 1, "sent": {channel: 1}, "skipped": {}, "failed": {}}}

    async def run() -> None:
        async with open_providers(settings.providers, settings.channels.providers()) as opened:
            providers.update(opened)
            config = Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            await serve(app, config)

    trio.run(run)


if __name__ == "__main__":
    main()
