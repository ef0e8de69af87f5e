"""TensorBoard event files without TensorFlow: scalar summaries as hand-encoded `Event` protos in
TFRecord framing (neither tensorflow, tensorboard nor tensorboardX is a dependency).

A TFRecord is `u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`, little
endian. The protos written (field numbers from tensorflow/core/util/event.proto and summary.proto):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
    """One serialized `Event` proto."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode())
                              + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _length_delimited(5, values)
    return out


class EventFileWriter:
    """`events.out.tfevents.<time>.<host>.<pid>` in `logdir`; `scalars(step, {tag: value})`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._file.write(tfrecord(encode_event(time.time(), step, scalars=values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
