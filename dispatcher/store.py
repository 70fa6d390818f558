"""Users and templates in MongoDB, read through the sync pymongo client on worker threads.

`pymongo.AsyncMongoClient` is asyncio-only, so every round trip runs in `trio.to_thread`; users
are streamed one cursor batch per thread hop, never a whole cluster at once. A selection of a few
ids (most single-recipient sends) is looked up together with the other such lookups made while
one is in flight: one query and one thread hop for all of them (`batching.py`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from typing import Any

import trio
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import MongoClient
from pymongo.errors import PyMongoError
from pymongo.uri_parser import parse_uri

from .batching import Batcher, Call
from .errors import RequestError, StoreError
from .messages import User
from .models import shown
from .settings import StoreSettings, UserFields

log = logging.getLogger(__name__)

# Selections of at most this many ids (and no cluster) share their lookups.
SHARED_LOOKUP_IDS = 16
# The CRUD service's document state: PUBLIC, DRAFT, TRASH or DELETED.
CRUD_STATE = "__STATE__"


class Store:
    def __init__(
        self, client: MongoClient[dict[str, Any]], settings: StoreSettings, fields: UserFields, batch_size: int = 500
    ) -> None:
        self._client = client
        db = client[settings.database]
        self._users = db[settings.users_collection]
        self._templates = db[settings.templates_collection]
        self._fields = fields
        self._states = tuple(settings.crud_states)
        self._batch_size = batch_size
        self._lookups = Batcher(self._look_up, lone_at_once=True)

    @classmethod
    def connect(cls, url: str, settings: StoreSettings, fields: UserFields, batch_size: int = 500) -> Store:
        return cls(MongoClient(url, tz_aware=True, **_defaults_unless_in(url)), settings, fields, batch_size)

    @property
    def client(self) -> MongoClient[dict[str, Any]]:
        return self._client

    def close(self) -> None:
        self._client.close()

    async def ping(self) -> bool:
        try:
            await trio.to_thread.run_sync(self._client.admin.command, "ping")
        except PyMongoError:
            return False
        return True

    async def find_template(self, template_id: str) -> dict[str, Any] | None:
        """The template, or None; `RequestError` for one whose `__STATE__` is not used (a DRAFT
        being edited, a template in the trash): saying so beats "no such template"."""
        query = {"_id": {"$in": _id_variants(template_id)}}
        try:
            doc = await trio.to_thread.run_sync(self._templates.find_one, query)
        except PyMongoError as exc:
            raise StoreError(f"template lookup failed: {exc}") from exc
        if doc is not None and self._states:
            state = doc.get(CRUD_STATE)
            if state is not None and state not in self._states:
                raise RequestError(
                    f"templateId: template {shown(template_id)} is {shown(state)}; only "
                    f"{', '.join(self._states)} templates are used ([store].crud_states)"
                )
        return doc

    def _state_filter(self) -> dict[str, Any]:
        """The CRUD service's `__STATE__` condition: one of `[store].crud_states`, or no
        `__STATE__` at all (documents not written by the CRUD service count as PUBLIC when
        PUBLIC is used). `$in` with null matches a missing field."""
        if not self._states:
            return {}
        states: list[Any] = list(self._states)
        if "PUBLIC" in states:
            states.append(None)
        return {CRUD_STATE: {"$in": states}}

    def user_query(self, recipients: Sequence[str], clusters: Sequence[str]) -> dict[str, Any]:
        """One query for ids OR clusters, so a user matched both ways comes back once. Each
        alternative carries the state condition after its own field, the order of the indexes
        `ensure_indexes` creates, so that each branch of the `$or` can use one."""
        state = self._state_filter()
        alternatives: list[dict[str, Any]] = []
        if recipients:
            ids: list[Any] = []
            for recipient in recipients:
                ids.extend(_id_variants(recipient) if self._fields.id == "_id" else [recipient])
            alternatives.append({self._fields.id: {"$in": ids}, **state})
        if clusters:
            alternatives.append({self._fields.clusters: {"$in": list(clusters)}, **state})
        return alternatives[0] if len(alternatives) == 1 else {"$or": alternatives}

    def user_indexes(self) -> list[list[tuple[str, int]]]:
        """The indexes that keep user selections indexed: (clusters, __STATE__), and (id field,
        __STATE__) unless the id is `_id`."""
        tail = [(CRUD_STATE, 1)] if self._states else []
        indexes = [[(self._fields.clusters, 1), *tail]]
        if self._fields.id != "_id":
            indexes.append([(self._fields.id, 1), *tail])
        return indexes

    async def ensure_indexes(self) -> None:
        """Create `user_indexes` (harmless when they exist). Best effort: the users collection
        belongs to whoever writes it (the CRUD service), and the service's database user may
        not be allowed to index it; that is logged with the index to create by hand."""
        for keys in self.user_indexes():
            try:
                await trio.to_thread.run_sync(self._users.create_index, keys)
            except PyMongoError as exc:
                log.warning(
                    "cannot create the index %s on %s (%s): create it by hand, or user selections scan the collection",
                    dict(keys),
                    self._users.name,
                    exc,
                )

    async def stream_users(
        self, recipients: Sequence[str], clusters: Sequence[str], only_ids: bool = False
    ) -> AsyncIterator[list[User]]:
        """Yield the selected users in batches, each user once, `_id` as a string (`only_ids`:
        documents holding nothing but the id field)."""
        if not clusters and 0 < len(recipients) <= SHARED_LOOKUP_IDS and not only_ids:
            users = await self._lookups.submit("users", recipients)
            if users:
                yield users
            return
        query = self.user_query(recipients, clusters)
        projection = {self._fields.id: 1} if only_ids else None
        cursor = self._users.find(query, projection, batch_size=self._batch_size)
        try:
            more = True
            while more:
                try:
                    batch, more = await trio.to_thread.run_sync(_next_batch, cursor, self._batch_size)
                except PyMongoError as exc:
                    raise StoreError(f"user lookup failed: {exc}") from exc
                for doc in batch:
                    doc["_id"] = str(doc["_id"])
                if batch:
                    yield batch
        finally:
            cursor.close()

    def _look_up(self, calls: list[Call]) -> None:
        """One query for the ids of every call (in a worker thread); each call gets the users its
        own ids select, each once, as `stream_users` would have yielded them."""
        field = self._fields.id
        wanted = [(call, self.user_query(call.payload, ())[field]["$in"]) for call in calls]
        query = {field: {"$in": [v for _, values in wanted for v in values]}, **self._state_filter()}
        try:
            docs = list(self._users.find(query))
        except PyMongoError as exc:
            for call in calls:
                call.fail(StoreError(f"user lookup failed: {exc}"))
            return
        by_value: dict[Any, list[dict[str, Any]]] = {}
        for doc in docs:
            value = doc.get(field)
            for key in value if isinstance(value, list) else [value]:  # $in matches array elements too
                with suppress(TypeError):  # an unhashable id value matches no requested id
                    by_value.setdefault(key, []).append(doc)
        for call, values in wanted:
            selected = {id(doc): doc for value in values for doc in by_value.get(value, ())}
            users = [dict(doc) for doc in selected.values()]  # each send its own documents
            for user in users:
                user["_id"] = str(user["_id"])
            call.succeed(users)

    def user_id(self, user: User) -> str:
        value = user.get(self._fields.id)
        return "" if value is None else str(value)


def _next_batch(cursor: Any, size: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to `size` documents, and whether more may follow (a small result set costs one thread
    hop, not a second one to discover the end)."""
    batch = []
    for doc in cursor:
        batch.append(doc)
        if len(batch) >= size:
            break
    return batch, cursor.alive


def _defaults_unless_in(url: str) -> dict[str, Any]:
    """Our timeouts, unless the URL sets its own (a keyword would override the URL's option)."""
    options = {key.lower() for key in parse_uri(url, validate=False, warn=True).get("options", {})}
    return {"serverSelectionTimeoutMS": 5000} if "serverselectiontimeoutms" not in options else {}


def _id_variants(value: str) -> list[Any]:
    """A valid ObjectId string matches both the ObjectId and the plain string id."""
    try:
        return [ObjectId(value), value]
    except (InvalidId, TypeError):
        return [value]


def seed_documents(url: str, settings: StoreSettings, document: dict[str, Any]) -> dict[str, int]:
    """Upsert `{"users": [...], "templates": [...]}` by `_id` (blocking; for the `seed` command)."""
    client: MongoClient[dict[str, Any]] = MongoClient(url, **_defaults_unless_in(url))
    try:
        db = client[settings.database]
        counts = {}
        for key, collection in (("users", settings.users_collection), ("templates", settings.templates_collection)):
            docs = document.get(key) or []
            for doc in docs:
                if "_id" in doc:
                    db[collection].replace_one({"_id": doc["_id"]}, doc, upsert=True)
                else:
                    db[collection].insert_one(doc)
            counts[key] = len(docs)
        return counts
    finally:
        client.close()
