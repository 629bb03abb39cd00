"""Read a W&B offline run file (``run-<id>.wandb``) without the network: the records the SDK wrote.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full,
2 first, 3 middle, 4 last) holding a ``wandb_internal_pb2.Record``; a block's tail shorter than a header is
zero padding.
"""
from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""
