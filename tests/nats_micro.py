"""Checks the NATS service ("micro") protocol of a running graph with the official nats-py client.

Usage: python nats_micro.py NATS_URL SERVICE:ENDPOINT[,ENDPOINT...] [...]
Each argument names a service (`{namespace}-{component}`) that must answer $SRV.PING,
$SRV.INFO (with those endpoints) and $SRV.STATS, and whose instances are registered in the
JetStream key-value bucket `dynamo-discovery` (what `nats kv ls` shows). Prints one line per
check; exits non-zero on the first failure.
"""
import asyncio
import json
import sys

import nats
import nats.js.errors


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")
    print(f"ok {name}")


async def gather(nc, subject, wait=1.0):
    """Every reply to one request on `subject` within `wait` seconds."""
    inbox = nc.new_inbox()
    replies = []

    async def on(msg):
        replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=on)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return replies


async def main(url, wanted):
    nc = await nats.connect(url)
    pings = await gather(nc, "$SRV.PING")
    names = {p["name"] for p in pings}
    check("ping types", all(p["type"] == "io.nats.micro.v1.ping_response" for p in pings), pings)
    infos = await gather(nc, "$SRV.INFO")
    for service, endpoints in wanted:
        check(f"{service} answers PING", service in names, sorted(names))
        mine = [i for i in infos if i["name"] == service]
        check(f"{service} answers INFO", len(mine) > 0, [i["name"] for i in infos])
        for i in mine:
            have = {e["name"] for e in i["endpoints"]}
            check(f"{service} {i['id']} endpoints", set(endpoints) <= have, sorted(have))
        stats = await gather(nc, f"$SRV.STATS.{service}")
        check(
            f"{service} STATS",
            len(stats) == len(mine) and all(s["type"] == "io.nats.micro.v1.stats_response" for s in stats),
            stats,
        )
    # Discovery: one key per (endpoint, instance) in the JetStream key-value bucket.
    # Each key is read on its own: nats-py's `keys()` can race its own watcher's
    # start marker against the first delivered entry and report an empty bucket.
    kv = await nc.jetstream().key_value("dynamo-discovery")
    for service, endpoints in wanted:
        ns, component = service.split("-", 1)
        ids = {i["id"] for i in infos if i["name"] == service}
        for ep in endpoints:
            want = [f"{ns}.{component}.{ep}.{i}" for i in ids]
            found = []
            for key in want:
                try:
                    found.append((await kv.get(key)).key)
                except nats.js.errors.KeyNotFoundError:
                    pass
            check(f"{service}.{ep} in the discovery bucket", found == want, (want, found))
    await nc.close()


wanted = []
for arg in sys.argv[2:]:
    service, endpoints = arg.split(":")
    wanted.append((service, endpoints.split(",")))
asyncio.run(main(sys.argv[1], wanted))
