#!/usr/bin/env python3
"""Writes the hand-made seed inputs of each fuzz target into fuzz/corpus/<target>/.

Seeds give the fuzzer the shapes it would take long to guess: whole MQTT sessions (3.1.1 and
5, with properties and wills), platform topics and filters, import files, update payloads and
real certificates (made with openssl). `fuzz/run.sh seed` runs this once, then the campaigns
grow and `cargo fuzz cmin` trims the corpora. Names are content hashes, as libFuzzer's are.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def save(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


# --- MQTT -------------------------------------------------------------------------------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b


def frame(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


def connect(level, client_id, flags=0x02, keepalive=30, p=b"", will=b"", user=None, password=None):
    if user is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = s("MQTT") + bytes([level, flags]) + struct.pack(">H", keepalive)
    if level == 5:
        body += props(p) if not p.startswith(b"\x00") else p
    body += s(client_id) + will
    if user is not None:
        body += s(user)
    if password is not None:
        body += s(password)
    return frame(0x10, body)


def publish(topic, payload, qos=0, pkid=1, retain=False, dup=False, v5props=None):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"")
    if v5props is not None:
        body += props(v5props)
    return frame(first, body + payload)


def subscribe(pkid, filters, v5props=None):
    body = struct.pack(">H", pkid)
    if v5props is not None:
        body += props(v5props)
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return frame(0x82, body)


def unsubscribe(pkid, filters, v5=False):
    body = struct.pack(">H", pkid) + (b"\x00" if v5 else b"")
    for f in filters:
        body += s(f)
    return frame(0xA2, body)


def ack(kind, pkid, v5tail=b""):
    first = {4: 0x40, 5: 0x50, 6: 0x62, 7: 0x70}[kind]
    return frame(first, struct.pack(">H", pkid) + v5tail)


def mqtt_seeds():
    dev = "dev-1"
    v4 = (
        connect(4, dev)
        + subscribe(1, [(f"devices/{dev}/commands", 1), (f"cohorts/c1/#", 1)])
        + publish(f"devices/{dev}/telemetry", b'{"t":21.5}', qos=1, pkid=2)
        + publish(f"devices/{dev}/state", b'{"fw":"1.0.0"}', qos=1, pkid=3, retain=True)
        + publish(f"devices/{dev}/commands/ack", b"{}", qos=2, pkid=4)
        + ack(6, 4)
        + ack(4, 1024)
        + ack(5, 1025)
        + ack(7, 1025)
        + unsubscribe(5, [f"cohorts/c1/#"])
        + frame(0xC0, b"")
        + frame(0xE0, b"")
    )
    save("mqtt_frames", v4)
    will = s(f"devices/{dev}/state") + s(b"offline")
    save("mqtt_frames", connect(4, dev, flags=0x2E, will=will, user="svc", password=b"key"))
    user_prop = b"\x26" + s("k") + s("v")
    v5_connect = connect(
        5,
        dev,
        flags=0x06,
        p=b"\x11" + struct.pack(">I", 3600) + b"\x21" + struct.pack(">H", 16)
        + b"\x27" + struct.pack(">I", 65536) + b"\x22" + struct.pack(">H", 0) + user_prop,
        will=props(b"\x18" + struct.pack(">I", 5) + b"\x01\x01" + b"\x03" + s("text/plain"))
        + will,
    )
    v5 = (
        v5_connect
        + subscribe(1, [(f"devices/{dev}/commands", 0x01 | 0x04 | 0x08 | 0x10)], v5props=b"\x0b\x07")
        + publish(
            f"devices/{dev}/telemetry",
            b"{}",
            qos=1,
            pkid=9,
            v5props=b"\x01\x01" + b"\x02" + struct.pack(">I", 60) + b"\x08" + s("reply/x")
            + b"\x09" + s(b"corr") + user_prop,
        )
        + publish(f"devices/{dev}/updates", b'{"status":"queued"}', qos=0, v5props=b"")
        + ack(4, 1024, b"\x10\x00")
        + ack(5, 7, b"\x00" + props(b"\x1f" + s("ok")))
        + unsubscribe(3, [f"devices/{dev}/commands"], v5=True)
        + frame(0xE0, b"\x04" + props(b"\x11" + struct.pack(">I", 0)))
    )
    save("mqtt_frames", v5)
    save("mqtt_frames", connect(5, dev, p=b"\x00") + frame(0xE0, b"\x00"))
    save("mqtt_frames", connect(5, "svc-client", p=b"\x00", user="svc", password=b"k")
         + subscribe(1, [("$share/g/devices/+/telemetry", 1), ("devices/#", 2)], v5props=b""))
    # Refusals the reader must make: a topic alias, a wildcard topic, a second CONNECT.
    save("mqtt_frames", connect(5, dev, p=b"\x00")
         + publish("a", b"x", qos=1, v5props=b"\x23\x00\x01"))
    save("mqtt_frames", connect(4, dev) + publish("devices/+/telemetry", b"x"))
    save("mqtt_frames", connect(4, dev) + connect(4, dev))
    # Protocol level 3 (MQIsdp) is refused by level.
    save("mqtt_frames", frame(0x10, s("MQIsdp") + bytes([3, 2]) + b"\x00\x1e" + s(dev)))
    # A large remaining length, announced and never sent.
    save("mqtt_frames", connect(4, dev) + b"\x30\xff\xff\xff\x7f")


# --- Topics and rights ------------------------------------------------------------------

def acl_seeds():
    seeds = [
        ["dev-1", "c1", "", "devices/dev-1/commands/#", "devices/dev-1/commands/ack", "dev-2"],
        ["dev-1", "c1", "q", "devices/dev-1/commands", "devices/dev-1/telemetry"],
        ["dev-1", "c1", "", "cohorts/c1/+", "cohorts/c1/updates", "cohorts/k9/updates"],
        ["dev-1", "", "", "devices/+/commands", "devices/dev-2/commands"],
        ["dev-1", "c1", "oC", "$share/g/devices/+/telemetry", "devices/dev-2/telemetry"],
        ["dev-1", "c1", "aP", "cohorts/#", "cohorts/c1/commands", "cohorts/k9/commands"],
        ["sensor.eu:01_x-y", "0190-abc", "vO", "devices/sensor.eu:01_x-y/assignment", "#"],
        ["dev-1", "c1", "", "devices/dev-1/#", "+/dev-1/commands", "devices/dev-1/commands/#/x"],
        ["a" * 128, "c1", "", "devices/" + "a" * 128 + "/commands", "a" * 129],
    ]
    for lines in seeds:
        save("topic_acl", "\n".join(lines))


# --- Import -----------------------------------------------------------------------------

def import_seeds():
    save("csv_import",
         "\ufeffID, Cohort ,tags,certificate\n"
         "d-1,c,a=1; b = 2,\n"
         'd-2,,,"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"\n'
         "d-3,,,ab:cd\n"
         "d-4,too,many,fields,here\n"
         "d-5,,a=1;a=2,\n")
    save("csv_import",
         "device_id,cohort_id,tags,certificate_pem,certificate_fingerprint\n"
         'dev-1,c1,"{""site"":""x""}",,' + "ab" * 32 + "\n"
         "dev-2,c2,,," + ":".join(["AB"] * 32) + "\n")
    save("csv_import", "id\n\n-bad\nok\n")
    save("csv_import", json.dumps([
        {"id": "a", "cohort_id": "c1", "tags": {"k": "v"}},
        {"id": "b", "colour": 1},
        3,
        {"id": "c", "certificate_fingerprint": "cd" * 32, "cohort": "c2"},
    ]))


# --- Update payloads --------------------------------------------------------------------

def update_seeds():
    manifest = {
        "product_id": "p1", "version": "1.2.3", "url": "http://127.0.0.1:9/fw.bin",
        "size": 42, "sha256": "ab" * 32,
    }
    release = dict(manifest, signature="c2ln" * 22, key_id="0123456789abcdef")
    save("release_manifest", json.dumps(manifest))
    save("release_manifest", json.dumps(release))
    for state in ["active", "paused", "completed", "canceled", "rolled_back"]:
        save("release_manifest", json.dumps({
            "deployment_id": "dep-1", "state": state, "release": release,
            "admit_below": 4294967296 if state == "active" else 1000, "jitter_s": 5,
            "revision": 3, "issued_at_ms": 1764763200000,
        }))
    save("release_manifest",
         '{"deployment_id":"d","status":"rejected","error":"bad signature","ts_ms":5,'
         '"firmware_version":"1.0.0"}')
    save("release_manifest", "O2i3nVhbdzDEgKhFY4hzR1k+gyuz7RbdbnZmGR6aoBM=")
    save("release_manifest",
         "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
         "-----END PUBLIC KEY-----\n")


# --- Certificates -----------------------------------------------------------------------

def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


def cert_seeds():
    with tempfile.TemporaryDirectory() as d:
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key",
            cwd=d)
        run("openssl", "req", "-x509", "-new", "-key", "ca.key",
            "-subj", "/O=Acme/CN=Acme Manufacturing CA", "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "subjectKeyIdentifier=hash", "-outform", "DER", "-out", "ca.der", cwd=d)
        run("openssl", "x509", "-inform", "DER", "-in", "ca.der", "-out", "ca.pem", cwd=d)
        with open(os.path.join(d, "leaf.cnf"), "w") as f:
            f.write("authorityKeyIdentifier=keyid\nsubjectAltName=DNS:dev-1\n")
        for name, subj, alg in [
            ("p256", "/O=Acme/CN=dev-1", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            ("two-cn", "/CN=dev-1/CN=dev-2",
             ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]),
            ("rsa", "/C=DE/O=Acme GmbH/OU=Line 3/CN=sensor.eu:01_x-y", ["-newkey", "rsa:1024"]),
            ("no-cn", "/O=Acme", ["-newkey", "ed25519"]),
        ]:
            run("openssl", "req", "-new", *alg, "-nodes", "-keyout", f"{name}.key",
                "-subj", subj, "-out", f"{name}.csr", cwd=d)
            run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                "-CAkey", "ca.key", "-CAcreateserial", "-days", "365", "-extfile", "leaf.cnf",
                "-outform", "DER", "-out", f"{name}.der", cwd=d)
            with open(os.path.join(d, f"{name}.der"), "rb") as f:
                save("certificate", f.read())
        with open(os.path.join(d, "ca.der"), "rb") as f:
            save("certificate", f.read())
        with open(os.path.join(d, "ca.pem")) as f:
            save("certificate", f.read())


if __name__ == "__main__":
    which = set(sys.argv[1:])
    for name, make in [("mqtt", mqtt_seeds), ("acl", acl_seeds), ("import", import_seeds),
                       ("update", update_seeds), ("cert", cert_seeds)]:
        if not which or name in which:
            make()
