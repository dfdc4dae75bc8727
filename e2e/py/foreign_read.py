"""Reads desired state as a device, with nats-py: an independent NATS client, so Fleet's
isolation does not rest on how async-nats happens to behave.

    foreign_read.py NATS_URL CA_FILE CREDS_FILE OWN_DEVICE OTHER_DEVICE

Prints one JSON object: the own desired state asked of the operator (expected to work), direct
reads of the own and the other device's desired keys from JetStream (expected to fail: a device
is no JetStream client), the KV helper (expected to fail), and the permission violations the
server reported.
"""

import asyncio
import json
import ssl
import sys

import nats

BUCKET = "fleet-desired"
STREAM = "KV_" + BUCKET


async def main(url, ca, creds, own, other):
    violations = []

    async def on_error(e):
        violations.append(str(e))

    nc = await nats.connect(
        url,
        user_credentials=creds,
        inbox_prefix="_INBOX.dev." + own,
        error_cb=on_error,
        allow_reconnect=False,
        tls=ssl.create_default_context(cafile=ca),
    )
    result = {}
    try:
        msg = await nc.request("fleet.sync." + own, b'{"schema":1}', timeout=5)
        result["sync"] = {"ok": True, "data": msg.data.decode()}
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        result["sync"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    js = nc.jetstream(timeout=2)
    for label, device in (("own", own), ("other", other)):
        subject = "$KV.%s.%s.web" % (BUCKET, device)
        try:
            msg = await js._jsm.get_msg(STREAM, subject=subject, direct=True)
            result[label] = {"ok": True, "data": msg.data.decode()}
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            result[label] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    # Also try the KV helper, which watches the whole bucket.
    try:
        kv = await js.key_value(BUCKET)
        entry = await kv.get(other + ".web")
        result["kv_helper"] = {"ok": True, "data": entry.value.decode()}
    except Exception as e:  # noqa: BLE001
        result["kv_helper"] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    await nc.flush()
    await nc.close()
    result["violations"] = violations
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
