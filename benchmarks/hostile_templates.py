"""Hostile templates against a running service (embedded store, outbox): one client sends each
template to 1,000 users, another polls /-/healthz meanwhile. Prints a Markdown table. Request texts
are Jinja here (`request_engine = "jinja"`), but the rows marked Handlebars, stored templates.
"Service CPU" includes the service's render worker processes.

Run: python benchmarks/hostile_templates.py (PYTHONPATH selects the checkout)
"""

import os
import subprocess
import sys
import time
import threading
import httpx
import psutil
from dispatcher.embedded_store import EmbeddedServer, free_port
import pymongo


def cpu_seconds(pid: int) -> float:
    """CPU of the service and its descendants (render workers) so far; the dead ones are lost,
    so a worker killed mid-template is not counted (an underestimate for those rows)."""
    total = 0.0
    root = psutil.Process(pid)
    for proc_ in [root, *root.children(recursive=True)]:
        try:
            times = proc_.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


store = EmbeddedServer(None)
c = pymongo.MongoClient(store.url)
c.messaging.users.insert_many(
    [{"_id": f"u{i}", "phoneNumber": f"+1555000{i:04d}", "clusters": ["all"]} for i in range(1000)]
)
port = free_port()
env = {
    **os.environ,
    "MONGODB_URL": store.url,
    "DISPATCHER__SERVER__PORT": str(port),
    "DISPATCHER__PROVIDERS__OUTBOX__DIR": "/tmp/hostile-outbox",
    "DISPATCHER__TEMPLATES__REQUEST_ENGINE": "jinja",
}
p = subprocess.Popen(
    [sys.executable, "-c", "from dispatcher.cli import main; raise SystemExit(main())", "serve"],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd="/tmp",
)
base = f"http://127.0.0.1:{port}"
while True:
    try:
        if httpx.get(base + "/-/healthz").status_code == 200:
            break
    except httpx.TransportError:
        time.sleep(0.1)
proc = psutil.Process(p.pid)
hostile = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "indent(10**9)": "{{ 'a\\nb'|indent(10**9) }}",
    "center(10**9)": "{{ 'x'|center(10**9) }}",
    "'%*s'|format": "{{ '%*s'|format(10**9, 'x') }}",
    "str.format width": "{{ '{:>500000000}'.format('x') }}",
    "lipsum(10**5)": "{{ lipsum(10**5) }}",
    "10**64**64**64**64": "{{ (10**64**64**64**64)|string|length }}",
    "~ doubling macro": "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ d('x', 40) }}",
    "data.update": "{{ data.update({'k': 'x'}) }}",
    "loop doubling with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "exponential sharing": (
        "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(100) %}"
        "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}"
    ),
    "Handlebars: 5 nested #each over 100 items": "{{#each data.a}}{{#each ../data.a}}{{#each ../../data.a}}"
    "{{#each ../../../data.a}}{{#each ../../../../data.a}}{{/each}}{{/each}}{{/each}}{{/each}}{{/each}}",
    "plain (benign)": "Hi {{ user._id }}",
}
handlebars = {name for name in hostile if name.startswith("Handlebars")}
c.messaging.message_templates.insert_many(
    [{"_id": name, "engine": "handlebars", "smsMessage": hostile[name]} for name in handlebars]
)
print("| template | answer | time (1000 users) | first error | slowest /-/healthz | service CPU | RSS after |")
print("|---|---|---|---|---|---|---|")
for name, text in hostile.items():
    lat = []
    done = threading.Event()

    def poll(done: threading.Event = done, lat: list[float] = lat) -> None:
        with httpx.Client() as h:
            while not done.is_set():
                t = time.perf_counter()
                h.get(base + "/-/healthz")
                lat.append(time.perf_counter() - t)
                time.sleep(0.01)

    th = threading.Thread(target=poll)
    th.start()
    t = time.perf_counter()
    cpu = cpu_seconds(p.pid)
    request = {"channels": ["sms"], "clusters": ["all"], "data": {"a": list(range(100))}}
    request.update({"templateId": name} if name in handlebars else {"messageContent": text})
    r = httpx.post(base + "/send", json=request, timeout=600)
    cpu = cpu_seconds(p.pid) - cpu
    el = time.perf_counter() - t
    done.set()
    th.join()
    body = r.json()
    err = body["failures"][0]["error"] if body.get("failures") else body.get("message", "")
    print(
        f"| `{name}` | {r.status_code} | {el:.2f} s | {err[:70]} | {max(lat) * 1000:.0f} ms | {cpu:.2f} s"
        f" | {proc.memory_info().rss / 2**20:.0f} MiB |"
    )
p.terminate()
p.wait()
store.stop()
