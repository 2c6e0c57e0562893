#!/usr/bin/env python3
"""Derive re-fragmented and deliberately broken first flights from the
captured ones. Re-run after replacing a capture; the outputs are committed.

usage: derive.py   (in this directory)
"""


def handshake_of(records):
    """Concatenated handshake payload of the records in `records`."""
    pos, hs = 0, b""
    while pos + 5 <= len(records):
        n = int.from_bytes(records[pos + 3:pos + 5], "big")
        hs += records[pos + 5:pos + 5 + n]
        pos += 5 + n
    return hs


def record(payload, content_type=22, version=b"\x03\x01"):
    return bytes([content_type]) + version + len(payload).to_bytes(2, "big") + payload


def split(hs, cuts):
    bounds = [0, *cuts, len(hs)]
    return b"".join(record(hs[a:b]) for a, b in zip(bounds, bounds[1:]))


def set_extensions(hs, transform):
    """Rebuild a ClientHello after `transform(list of (type, data))`."""
    body = hs[4:]
    i = 2 + 32
    i += 1 + body[i]
    i += 2 + int.from_bytes(body[i:i + 2], "big")
    i += 1 + body[i]
    head, ext_block = body[:i], body[i + 2:]
    exts, j = [], 0
    while j < len(ext_block):
        t = int.from_bytes(ext_block[j:j + 2], "big")
        n = int.from_bytes(ext_block[j + 2:j + 4], "big")
        exts.append((t, ext_block[j + 4:j + 4 + n]))
        j += 4 + n
    exts = transform(exts)
    block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in exts)
    body = head + len(block).to_bytes(2, "big") + block
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_ext(name):
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    return len(entry).to_bytes(2, "big") + entry


def write(name, data):
    with open(name, "wb") as f:
        f.write(data)
    print(f"{name}: {len(data)} bytes")


curl = handshake_of(open("curl-7.88-openssl-3.0-alpn-h2.bin", "rb").read())
pq = handshake_of(open("rustls-0.23-stub-x25519mlkem768-ech-grease.bin", "rb").read())

# Valid fragmentations: TLS lets a handshake message span records of any size.
write("curl-7.88-split-3-records.bin", split(curl, [100, 300]))
write("rustls-pq-split-inside-handshake-header.bin", split(pq, [2, 1000]))
write("rustls-pq-split-5-records.bin", split(pq, [400, 800, 1200, 1600]))

# Refusals.
write("error-http-request.bin", b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
# SSLv2-compatible CLIENT-HELLO (RFC 5246 appendix E.2): 2-byte length with the
# high bit set, msg type 1, version 3.1, one cipher spec, 16-byte challenge.
v2 = b"\x01\x03\x01" + (3).to_bytes(2, "big") + b"\x00\x00" + (16).to_bytes(2, "big") + b"\x00\x00\x2f" + bytes(range(16))
write("error-sslv2-compat-hello.bin", (0x8000 | len(v2)).to_bytes(2, "big") + v2)
# Declares a 64 KiB hello in its first 9 bytes: refused before any body arrives.
write("error-declared-64k-oversized.bin", record(b"\x01\x01\x00\x00")[:5].replace(b"\x00\x04", b"\x40\x00") + b"\x01\x01\x00\x00")
write("error-server-hello-type.bin", split(b"\x02" + curl[1:], []))
write(
    "error-duplicate-server-name.bin",
    split(set_extensions(curl, lambda e: e + [(0, sni_ext(b"evil.example.test"))]), []),
)
write(
    "error-server-name-with-nul.bin",
    split(set_extensions(curl, lambda e: [(t, sni_ext(b"good.example.test\x00.evil.test") if t == 0 else d) for t, d in e]), []),
)
write(
    "error-ccs-between-fragments.bin",
    record(curl[:200]) + record(b"\x01", content_type=20) + record(curl[200:]),
)
