"""The README's examples work as written: `dispatcher seed` then the embedding example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent


def test_seed_then_embedding_example(mongo_url: str, database: Any, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        textwrap.dedent(f"""
        [store]
        url = "{mongo_url}"
        database = "{database.name}"
        [providers.outbox]
        dir = "{tmp_path / "outbox"}"
    """)
    )
    env = {"PATH": "/usr/bin:/bin", "DISPATCHER_CONFIG": str(config)}
    if "PYTHONPATH" in os.environ:  # the checkout under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    for _ in range(2):  # seeding twice is harmless
        seeded = subprocess.run(
            [sys.executable, "-m", "dispatcher", "seed", str(ROOT / "examples" / "seed.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert seeded.returncode == 0, seeded.stderr
    assert "seeded 4 users and 1 templates" in seeded.stdout
    assert database.users.count_documents({}) == 4

    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed.py")], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    decoder = json.JSONDecoder()
    result, end = decoder.raw_decode(run.stdout)
    job, _ = decoder.raw_decode(run.stdout[end:].lstrip())
    assert job["status"] == "done" and job["summary"]["sent"] == {"sms": 2}
    # beta: Ada (e-mail, phone), Grace (e-mail, phone), Linus (e-mail only). Every answer names its job.
    assert isinstance(result.pop("id"), str)
    assert result == {
        "failures": [],
        "summary": {"users": 3, "sent": {"email": 3, "sms": 2}, "skipped": {"sms": 1}, "failed": {}},
    }
    mails = sorted((tmp_path / "outbox" / "email").glob("*.eml"))
    assert len(mails) == 3
    assert any(b"starts on 01/12/2026" in m.read_bytes() for m in mails)
