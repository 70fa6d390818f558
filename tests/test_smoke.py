from dispatcher import Dispatcher


async def test_cluster_send_writes_outbox(dispatcher: Dispatcher, database, outbox) -> None:
    database.users.insert_many(
        [{"_id": "a", "emailAddress": "a@example.com", "clusters": ["c"]}, {"_id": "b", "clusters": ["c"]}]
    )
    result = await dispatcher.send(
        {"channels": ["email"], "clusters": ["c"], "messageTitle": "T", "messageContent": "Hi {{user._id}}"}
    )
    assert result.summary.users == 2
    assert result.summary.sent == {"email": 1} and result.summary.skipped == {"email": 1}
    assert len(list((outbox / "email").glob("*.eml"))) == 1
