#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into
seeds/<target>/<name> (the encodings are documented on each target in
backend/src/fuzzing.rs). Run once to rebuild the seeds; the fuzzers' own
finds go to corpus/<target>/ (run.sh starts from both directories and
minimizes corpus/ with `cargo fuzz cmin`)."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# virtio-blk ------------------------------------------------------------------
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
BLOB = 0x2000  # FUZZ_BLOB_ADDR
REGION1 = 0x20000  # FUZZ_REGION1_ADDR
# Address modes of fuzz_desc_addr.
RAW, IN_BLOB, IN_REGION1, NEAR_END = 0, 1, 2, 3


def geometry(read_only=False, discard=True, write_zeroes=True, sectors=2048,
             seg_max=8, size_max=1 << 16):
    flags = (1 if read_only else 0) | (2 if discard else 0) | \
        (4 if write_zeroes else 0) | 8 | 16
    return struct.pack("<BQIIBQQIIIH", 0, sectors, 512, 4096, flags,
                       1 << 20, 1 << 20, 4096, size_max, seg_max, 2)


def desc(mode, addr, length, flags, nxt=0):
    return struct.pack("<BQIHH", mode, addr, length, flags, nxt)


def chain(*descs):
    """Descriptors in table order, each NEXT to the following one."""
    out = []
    for i, (mode, addr, length, flags) in enumerate(descs):
        last = i == len(descs) - 1
        out.append(desc(mode, addr, length, flags | (0 if last else NEXT),
                        0 if last else i + 1))
    return out


def virtio(descs, blob=b"", geo=None, qlog=4, head=0):
    geo = geo if geo is not None else geometry()
    return geo + struct.pack("<BHB", qlog, head, len(descs)) + b"".join(descs) + blob


def header(req_type, sector=0):
    return struct.pack("<IIQ", req_type, 0, sector)


def at(blob, offset, data):
    blob = blob.ljust(offset, b"\0")
    return blob[:offset] + data + blob[offset + len(data):]


def status(length=1):
    return (IN_BLOB, 0x3000, length, WRITE)


def virtio_seeds():
    hdr = lambda: (IN_BLOB, 0, 16, 0)
    s = {}
    s["read"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 4096, WRITE), status()),
                       header(T_IN, 8))
    s["write"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 1024, 0), status()),
                        header(T_OUT, 2))
    s["write-two-segments"] = virtio(
        chain(hdr(), (IN_BLOB, 0x1000, 512, 0), (IN_REGION1, 0x100, 512, 0), status()),
        header(T_OUT, 0))
    s["read-status-shares-data"] = virtio(
        chain(hdr(), (IN_BLOB, 0x1000, 513, WRITE)), header(T_IN, 0))
    s["header-split"] = virtio(
        chain((IN_BLOB, 0, 8, 0), (IN_BLOB, 8, 8 + 512, 0), status()),
        header(T_OUT, 1))
    s["flush"] = virtio(chain(hdr(), status()), header(T_FLUSH))
    s["get-id"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 20, WRITE), status()),
                         header(T_GET_ID))
    rng = struct.pack("<QII", 8, 8, 0)
    s["discard"] = virtio(chain(hdr(), (IN_BLOB, 0x100, 16, 0), status()),
                          at(header(T_DISCARD), 0x100, rng))
    rng = struct.pack("<QII", 0, 16, 1)
    s["write-zeroes-unmap"] = virtio(chain(hdr(), (IN_BLOB, 0x100, 16, 0), status()),
                                     at(header(T_WRITE_ZEROES), 0x100, rng))
    s["write-read-only"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 512, 0), status()),
                                  header(T_OUT, 0), geometry(read_only=True))
    s["read-beyond-capacity"] = virtio(
        chain(hdr(), (IN_BLOB, 0x1000, 1024, WRITE), status()), header(T_IN, 2047))
    s["unknown-type"] = virtio(chain(hdr(), status()), header(99))
    s["wrong-direction"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 512, 0), status()),
                                  header(T_IN, 0))
    s["no-status"] = virtio(chain(hdr(), (IN_BLOB, 0x1000, 512, WRITE)[:3] + (0,)),
                            header(T_IN, 0))
    s["crosses-regions"] = virtio(
        chain(hdr(), (NEAR_END, 0x100 | 0x80, 0x100, WRITE), status()), header(T_IN, 0))
    s["outside-memory"] = virtio(
        chain(hdr(), (RAW, 0x1_0000_0000, 512, WRITE), status()), header(T_IN, 0))
    # desc 0 -> 1 -> 0: a loop the chain's TTL must end.
    s["loop"] = virtio([desc(IN_BLOB, 0, 16, NEXT, 1),
                        desc(IN_BLOB, 0x1000, 512, WRITE | NEXT, 0)], header(T_IN, 0))
    # An indirect table of three descriptors at blob + 0x2000.
    table = b"".join([
        struct.pack("<QIHH", BLOB, 16, NEXT, 1),
        struct.pack("<QIHH", BLOB + 0x1000, 4096, WRITE | NEXT, 2),
        struct.pack("<QIHH", BLOB + 0x3000, 1, WRITE, 0),
    ])
    s["indirect-read"] = virtio([desc(IN_BLOB, 0x2000, 48, INDIRECT)],
                                at(header(T_IN, 16), 0x2000, table))
    s["too-many-segments"] = virtio(
        chain(hdr(), *[(IN_BLOB, 0x1000 + 512 * i, 512, WRITE) for i in range(9)],
              status()), header(T_IN, 0))
    s["big-queue-head"] = virtio(chain(hdr(), status()), header(T_FLUSH), qlog=8, head=0)
    return s


# ublk ------------------------------------------------------------------------
def ublk(op_flags, start, nr, cap=1 << 30, max_io=1 << 20, ro=0):
    return struct.pack("<IQIQIB", op_flags, start, nr, cap, max_io, ro)


def ublk_seeds():
    return {
        "read": ublk(0, 8, 8),
        "write": ublk(1, 0, 2048),
        "write-fua": ublk(1 | 1 << 13, 16, 8),
        "flush": ublk(2, 0, 0),
        "discard": ublk(3, 0, 1 << 20),
        "write-zeroes-nounmap": ublk(5 | 1 << 15, 0, 8),
        "write-same": ublk(4, 0, 8),
        "beyond-capacity": ublk(0, (1 << 21) - 4, 8),
        "too-large": ublk(0, 0, 4096),
        "read-only-write": ublk(1, 0, 8, ro=1),
    }


# monitor ---------------------------------------------------------------------
def rpc(method, params=None, rid=1):
    import json
    req = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        req["params"] = params
    return json.dumps(req).encode()


def monitor_seeds():
    s = {
        "node_add": rpc("node_add", {"name": "spare", "path": "/dev/nvme1n1"}),
        "node_add-create": rpc("node_add", {"name": "img", "path": "vm.img",
                                            "read_only": False, "create_size": "1G"}),
        "node_add-null": rpc("node_add", {"name": "n", "path": "null:8G"}),
        "node_remove": rpc("node_remove", {"name": "spare"}),
        "node_list": rpc("node_list"),
        "export_add": rpc("export_add", {"name": "vm2", "node": "spare",
                                         "type": "vhost-user", "socket": "vm2.sock",
                                         "queues": 2, "queue_depth": 64,
                                         "read_only": True, "serial": "s",
                                         "poll_us": 10, "socket_mode": 0o660}),
        "export_add-ublk": rpc("export_add", {"name": "l", "node": "spare",
                                              "type": "ublk", "ublk_id": 0}),
        "export_remove": rpc("export_remove", {"name": "vm2", "mode": "force"}),
        "export_list": rpc("export_list", {}),
        "export_stats": rpc("export_stats", {"name": "vm2"}),
        "export_qos": rpc("export_qos", {"export": "vm0", "group": "tenant-a",
                                         "qos": {"iops": 5000, "bps": "200M",
                                                 "burst_seconds": 1}}, rid=7),
        "export_qos-clear": rpc("export_qos", {"export": "vm0", "clear": True}, rid=8),
        "job_mirror": rpc("job_mirror", {"node": "a", "target": "b", "id": "m",
                                         "chunk_bytes": 65536, "max_in_flight": 16}),
        "job_list": rpc("job_list"),
        "job_status": rpc("job_status", {"id": "mirror0"}),
        "job_cancel": rpc("job_cancel", {"id": "mirror0"}),
        "job_complete": rpc("job_complete", {"id": "mirror0"}),
        "daemon_stats": rpc("daemon_stats"),
        "rpc_methods": rpc("rpc_methods"),
        "shutdown": rpc("shutdown", rid="s"),
        "notification": b'{"jsonrpc":"2.0","method":"node_list"}',
        "unknown-method": rpc("no_such_method"),
        "bad-params": rpc("node_remove", {"name": 3}),
        "params-array": b'{"jsonrpc":"2.0","id":8,"method":"node_remove","params":["d"]}',
        "batch": b'[{"jsonrpc":"2.0","id":1,"method":"node_list"}]',
        "no-jsonrpc": b'{"id":2,"method":"node_list"}',
        "not-json": b"{not json",
        "binary": b"\xff\xfe\x00{",
    }
    return s


# config ----------------------------------------------------------------------
README_CONFIG = b'''[daemon]
poll_us = 50

[[disk]]
name = "vm0-root"
path = "/var/lib/images/vm0.img"
create_size = "20G"          # create sparse if missing

[[disk]]
name = "scratch"
path = "/dev/nvme1n1"

[[export]]
name = "vm0"
disk = "vm0-root"
type = "vhost-user"
socket = "/run/sluice/vm0.sock"
queues = 2
queue_depth = 128
serial = "vm0-root"
socket_mode = 0o660

[[export]]
name = "local"
disk = "scratch"
type = "ublk"
ublk_id = 0
'''


def config_seeds():
    with open(os.path.join(HERE, "..", "src", "default.toml"), "rb") as f:
        default = f.read()
    return {
        "readme": README_CONFIG,
        "embedded-default": default,
        "null-read-only": b'[daemon]\ncontrol = "ctl.sock"\n[[disk]]\nname = "n"\n'
                          b'path = "null:64M"\n[[export]]\nname = "b"\ndisk = "n"\n'
                          b'type = "vhost-user"\nsocket = "b.sock"\nread_only = true\n',
        "qos-group": b'[[disk]]\nname = "n"\npath = "null:64M"\n[[export]]\nname = "a"\n'
                     b'disk = "n"\ntype = "vhost-user"\nsocket = "a.sock"\n'
                     b'qos_group = "tenant-a"\n[export.qos]\niops = 5000\nbps = "200M"\n'
                     b'read_iops = 100\nwrite_bps = 1048576\nburst_seconds = 1\n'
                     b'[[export]]\nname = "b"\ndisk = "n"\ntype = "vhost-user"\n'
                     b'socket = "b.sock"\nqos_group = "tenant-a"\n',
        "bad-qos": b"[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\n"
                   b"disk='x'\ntype='vhost-user'\nsocket='s'\n[export.qos]\niops=0",
        "bad-queues": b"[[disk]]\nname='x'\npath='null:1M'\n[[export]]\nname='a'\n"
                      b"disk='x'\ntype='vhost-user'\nsocket='s'\nqueues=0",
        "unknown-field": b"[[disk]]\nname='x'\npath='null:1M'\nbogus=1",
        "empty": b"",
    }


def main():
    for target, seeds in [("virtio_blk_decode", virtio_seeds()),
                          ("ublk_io", ublk_seeds()),
                          ("monitor_request", monitor_seeds()),
                          ("config_toml", config_seeds())]:
        d = os.path.join(HERE, "seeds", target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
