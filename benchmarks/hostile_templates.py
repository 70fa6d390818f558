"""Hostile templates against a running service (embedded store, outbox): one client sends each
template to 1,000 users, another polls /-/healthz meanwhile. Prints a Markdown table.

Run: python benchmarks/hostile_templates.py
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
}
print("| template | answer | time (1000 users) | first error | slowest /-/healthz | service RSS after |")
print("|---|---|---|---|---|---|")
for name, text in hostile.items():
    lat = []
    done = threading.Event()

    def poll():
        with httpx.Client() as h:
            while not done.is_set():
                t = time.perf_counter()
                h.get(base + "/-/healthz")
                lat.append(time.perf_counter() - t)
                time.sleep(0.01)

    th = threading.Thread(target=poll)
    th.start()
    t = time.perf_counter()
    r = httpx.post(
        base + "/send", json={"channels": ["sms"], "clusters": ["all"], "messageContent": text, "data": {}}, timeout=600
    )
    el = time.perf_counter() - t
    done.set()
    th.join()
    body = r.json()
    err = body["failures"][0]["error"] if body.get("failures") else body.get("message", "")
    print(
        f"| `{name}` | {r.status_code} | {el:.2f} s | {err[:70]} | {max(lat) * 1000:.0f} ms | {proc.memory_info().rss / 2**20:.0f} MiB |"
    )
p.terminate()
p.wait()
store.stop()
