"""What rendering one user's message costs the service: CPU of the service process and of its
render workers (its descendants), and wall time, per user, rendering chunks of users the way the
renderer actor does. Works against this checkout or an older one (worker threads under a budget,
`render_budget.render_batch`), so the two can be run side by side:

  PYTHONPATH=/path/to/old python benchmarks/render_cost.py plain
  PYTHONPATH=. python benchmarks/render_cost.py plain
  PYTHONPATH=. python benchmarks/render_cost.py each

TEXT: `plain` (the load-test harness's body, renders inline now), `each` (the same plus an empty
Handlebars `#each`: a worker process now), `jinja-for` (the same plus an empty Jinja `for`, with
`request_engine = "jinja"`). Options: --chunk N users per hop (32, the actor's largest), --chunks N.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import psutil
import trio

from dispatcher.models import SendRequest
from dispatcher.plan import build_plan
from dispatcher.settings import settings_from_dict
from dispatcher.templating import Renderer

BODY = "Hi {{ user.name }}, your load-test code is {{ data.code }}."
TEXTS = {
    "plain": (BODY, None),
    "each": (BODY + "{{#each user.none}}{{/each}}", "handlebars"),
    "jinja-for": (BODY + "{% for x in user.none %}{% endfor %}", "jinja"),
}


def cpu_with_descendants() -> float:
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def chunk_renderer(lane, data, budget):  # type: ignore[no-untyped-def]
    """An async function rendering a chunk of users, with whichever code is importable."""
    try:
        from dispatcher.render_pool import RenderPool
    except ImportError:  # the older code: one worker thread per chunk, a watchdog per rendering
        from actors.renderer import _render_one  # type: ignore[attr-defined]
        from dispatcher.render_budget import render_batch  # type: ignore[import-not-found]

        async def render_old(users):  # type: ignore[no-untyped-def]
            return await render_batch([partial(_render_one, user, lane, data) for user in users], budget)

        return render_old, "worker thread (old)"
    renderer = Renderer(default_locale="en-US", max_template_chars=65536, max_rendered_chars=262144)
    pool = RenderPool(renderer.config, budget, 256 << 20)

    async def render_new(users):  # type: ignore[no-untyped-def]
        return await pool.render_users(lane, users, data)

    return render_new, "inline" if not lane.isolated else "worker process"


async def main(text: str, chunk: int, chunks: int) -> None:
    content, engine = TEXTS[text]
    config = {"templates": {"request_engine": engine}} if engine else {}
    try:
        settings = settings_from_dict(config)
    except Exception:  # an older checkout without the setting: Jinja was its only request syntax
        settings = settings_from_dict({})
    renderer = Renderer(default_locale="en-US", max_template_chars=65536, max_rendered_chars=262144)
    request = SendRequest.parse(
        {"channels": ["sms"], "clusters": ["all"], "messageContent": content, "data": {"code": "LT-2026"}}
    )
    lane = build_plan(request, None, settings, renderer, None, lambda user: str(user["_id"])).channels[0]
    render, where = chunk_renderer(lane, request.data, 0.05)
    users = [{"_id": f"u{i}", "name": f"N{i}", "phoneNumber": "+15550001234"} for i in range(chunk)]
    await render(users)  # warm-up: workers started, templates compiled
    cpu, wall = cpu_with_descendants(), time.perf_counter()
    for _ in range(chunks):
        outcomes = await render(users)
    cpu, wall = cpu_with_descendants() - cpu, time.perf_counter() - wall
    assert outcomes[-1].content.body.startswith(f"Hi N{chunk - 1}"), outcomes[-1]
    n = chunk * chunks
    print(f"{text} ({where}, chunks of {chunk}): CPU {cpu / n * 1e6:.1f} us/user, wall {wall / n * 1e6:.1f} us/user")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("text", choices=TEXTS)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=200)
    options = parser.parse_args()
    trio.run(main, options.text, options.chunk, options.chunks)
