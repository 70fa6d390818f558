"""The CRUD service's `__STATE__`: only PUBLIC users and templates (and documents without a state)
are used by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from dispatcher import Settings, open_dispatcher
from dispatcher.app import create_app

PUBLIC_TEMPLATE = ObjectId("65a000000000000000000001")
DRAFT_TEMPLATE = ObjectId("65a000000000000000000002")


@pytest.fixture
def seeded(database: Any) -> Any:
    database.users.insert_many(
        [
            {"_id": "pub", "emailAddress": "pub@example.com", "clusters": ["news"], "__STATE__": "PUBLIC"},
            {"_id": "old", "emailAddress": "old@example.com", "clusters": ["news"]},  # no __STATE__
            {"_id": "trash", "emailAddress": "trash@example.com", "clusters": ["news"], "__STATE__": "TRASH"},
            {"_id": "draft", "emailAddress": "draft@example.com", "clusters": ["news"], "__STATE__": "DRAFT"},
            {"_id": "gone", "emailAddress": "gone@example.com", "clusters": ["news"], "__STATE__": "DELETED"},
        ]
    )
    database.message_templates.insert_many(
        [
            {"_id": PUBLIC_TEMPLATE, "emailTitle": "T", "emailMessage": "public", "__STATE__": "PUBLIC"},
            {"_id": DRAFT_TEMPLATE, "emailTitle": "T", "emailMessage": "draft", "__STATE__": "DRAFT"},
        ]
    )
    return database


def recipients_of(outbox: Path) -> set[str]:
    found = set()
    for eml in (outbox / "email").glob("*.eml"):
        for line in eml.read_text().splitlines():
            if line.startswith("To: "):
                found.add(line[4:])
    return found


async def test_a_trash_user_selected_by_cluster_receives_nothing(
    seeded: Any, make_settings: Callable[..., Settings], outbox: Path
) -> None:
    async with open_dispatcher(make_settings()) as d:
        result = await d.send(
            {
                "channels": ["email"],
                "clusters": ["news"],
                "recipients": ["trash", "draft"],
                "templateId": str(PUBLIC_TEMPLATE),
            }
        )
    assert recipients_of(outbox) == {"pub@example.com", "old@example.com"}
    assert result.summary.users == 2
    # Named by id, a user that is not PUBLIC is not found, like one that does not exist.
    assert sorted((f.user_id, f.error) for f in result.failures) == [
        ("draft", "user not found"),
        ("trash", "user not found"),
    ]


async def test_few_recipients_take_the_shared_lookup_with_the_same_rule(
    seeded: Any, make_settings: Callable[..., Settings], outbox: Path
) -> None:
    async with open_dispatcher(make_settings()) as d:
        result = await d.send(
            {"channels": ["email"], "recipients": ["pub", "trash"], "messageTitle": "t", "messageContent": "c"}
        )
    assert recipients_of(outbox) == {"pub@example.com"}
    assert [(f.user_id, f.error) for f in result.failures] == [("trash", "user not found")]


async def test_a_draft_template_is_refused_with_a_clear_400(
    seeded: Any, make_settings: Callable[..., Settings]
) -> None:
    async with open_dispatcher(make_settings()) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            client = test_app.test_client()
            response = await client.post(
                "/send", json={"channels": ["email"], "recipients": ["pub"], "templateId": str(DRAFT_TEMPLATE)}
            )
            body = await response.get_json()
    assert response.status_code == 400
    assert body["message"] == (
        f"templateId: template '{DRAFT_TEMPLATE}' is 'DRAFT'; only PUBLIC templates are used ([store].crud_states)"
    )


async def test_crud_states_choose_what_is_used(
    seeded: Any, make_settings: Callable[..., Settings], outbox: Path
) -> None:
    async with open_dispatcher(make_settings(store={"crud_states": ["DRAFT"]})) as d:
        await d.send({"channels": ["email"], "clusters": ["news"], "templateId": str(DRAFT_TEMPLATE)})
    # Without PUBLIC, documents without a state are not used either.
    assert recipients_of(outbox) == {"draft@example.com"}


async def test_the_selection_indexes_exist_and_lead_with_the_queried_fields(
    seeded: Any, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(user_fields={"id": "fiscalCode"})
    async with open_dispatcher(settings) as d:
        await d.store.ensure_indexes()
        query = d.store.user_query(["RSS"], ["news"])
    keys = [list(index["key"].items()) for index in seeded.users.list_indexes()]
    assert [("clusters", 1), ("__STATE__", 1)] in keys and [("fiscalCode", 1), ("__STATE__", 1)] in keys
    # Each branch of the $or names an index's fields in its order: each can use one.
    assert [list(branch) for branch in query["$or"]] == [["fiscalCode", "__STATE__"], ["clusters", "__STATE__"]]
