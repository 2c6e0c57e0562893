#!/usr/bin/env python3
"""Copies the Envoy .proto files sluice-xds needs into vendor/.

The set is the import closure of ROOTS (the types a plain Envoy resource
may be or may hold behind an `Any`), taken from the envoy-types crate in
cargo's registry, so the descriptors match the generated structs. Run it
again whenever envoy-types is bumped, with the new version:

    python3 xds-server/proto/vendor.py 0.7.7

google/protobuf/*.proto are left out: protox has them built in.
"""
import glob
import os
import re
import shutil
import sys

ROOTS = [
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
]
# Where envoy-types keeps each repository's protos.
SEARCH = ["data-plane-api", "xds", "protoc-gen-validate", "googleapis", "cel-spec/proto"]
IMPORT = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"', re.M)


def main():
    version = sys.argv[1] if len(sys.argv) > 1 else "0.7.7"
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = glob.glob(f"{home}/registry/src/*/envoy-types-{version}/proto")
    if not found:
        sys.exit(f"envoy-types {version} is not in {home}/registry/src: build sluice-xds once first")
    base = found[0]
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "vendor")
    shutil.rmtree(out, ignore_errors=True)
    todo, done = list(ROOTS), set()
    while todo:
        path = todo.pop()
        if path in done or path.startswith("google/protobuf/"):
            continue
        done.add(path)
        src = next((f for d in SEARCH if os.path.isfile(f := os.path.join(base, d, path))), None)
        if src is None:
            sys.exit(f"{path}: not found under {base}")
        dst = os.path.join(out, path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        with open(src, encoding="utf-8") as f:
            todo.extend(IMPORT.findall(f.read()))
    with open(os.path.join(out, "ENVOY_TYPES_VERSION"), "w", encoding="utf-8") as f:
        f.write(version + "\n")
    print(f"{len(done)} files from envoy-types {version} into {out}")


if __name__ == "__main__":
    main()
