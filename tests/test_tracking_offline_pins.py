"""Pins of diffusion_lab.tracking.offline: W&B's run log is a LevelDB-style log of 32 KiB blocks; a record longer than
what is left of a block is split into FIRST/MIDDLE/LAST chunks, and a block tail too short for a chunk header is
zero padding. Every such record must read back whole (the logs here are written by the format's rules below)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from diffusion_lab.tracking.offline import _log_records, read_offline_run

BLOCK = 32 * 1024
HEADER = 7  # a chunk header: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
FILE_HEADER = b":W&B\xe1\xbe\x00"  # W&B's 7-byte file header: magic, 0xBEE1, version 0


def encode_log(records: list[bytes]) -> tuple[bytes, list[int]]:
    """A run log holding ``records`` as the LevelDB log writer lays them out (leveldb doc/log_format.md), and the
    chunk types written.

    A chunk never crosses a block boundary; a block tail shorter than a header is zero-filled; a record that does
    not fit is FIRST, MIDDLE…, LAST (a FIRST chunk may be empty when exactly a header's room is left)."""
    out, kinds = bytearray(FILE_HEADER), []
    for record in records:
        data, first = record, True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < HEADER:
                out += b"\x00" * left
                continue
            chunk, data = data[: left - HEADER], data[left - HEADER :]
            kind = (FULL if not data else FIRST) if first else (LAST if not data else MIDDLE)
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            kinds.append(kind)
            first = False
            if not data:
                break
    return bytes(out), kinds


def payload(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from every other payload's at every offset."""
    return bytes((i * 7 + seed * 31) % 251 for i in range(n))


def read_back(tmp_path: Path, records: list[bytes]) -> tuple[list[bytes], list[int]]:
    log, kinds = encode_log(records)
    path = tmp_path / "run-abc.wandb"
    path.write_bytes(log)
    return list(_log_records(path)), kinds


def test_a_record_spanning_two_block_boundaries_reads_back_whole(tmp_path):
    records = [payload(100, 0), payload(80_000, 1), payload(50, 2)]  # 80 kB: FIRST, MIDDLE, LAST over 3 blocks
    got, kinds = read_back(tmp_path, records)
    assert kinds == [FULL, FIRST, MIDDLE, LAST, FULL]
    assert [len(r) for r in got] == [100, 80_000, 50] and got == records


def test_a_block_tail_shorter_than_a_header_is_padding(tmp_path):
    first = payload(BLOCK - len(FILE_HEADER) - HEADER - 3, 0)  # leaves 3 bytes of block 0: zero padding
    records = [first, payload(40_000, 1), payload(10, 2)]
    got, kinds = read_back(tmp_path, records)
    assert kinds == [FULL, FIRST, LAST, FULL]
    assert got == records


def test_a_block_tail_of_exactly_a_header_holds_an_empty_first_chunk(tmp_path):
    first = payload(BLOCK - len(FILE_HEADER) - HEADER - HEADER, 0)  # leaves 7 bytes: an empty FIRST chunk fits there
    records = [first, payload(300, 1), payload(10, 2)]
    got, kinds = read_back(tmp_path, records)
    assert kinds == [FULL, FIRST, LAST, FULL]
    assert got == records


def test_a_corrupt_middle_chunk_is_refused_naming_the_file(tmp_path):
    log, _ = encode_log([payload(80_000, 1)])
    broken = bytearray(log)
    broken[BLOCK + HEADER + 100] ^= 0x01  # a bit of the MIDDLE chunk's data
    path = tmp_path / "run-abc.wandb"
    path.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match=rf"{path}: corrupt record at byte {BLOCK}$"):
        list(_log_records(path))


def test_read_offline_run_gets_a_config_value_that_spans_blocks(tmp_path):
    """End to end: a run record whose config holds a 100 kB value (e.g. a long resume history), then a summary and
    the exit record, as W&B writes them."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = pb.Record()
    run.run.run_id, run.run.run_group, run.run.job_type = "abc", "sweep-1", "train"
    big = "".join(chr(ord("a") + i % 26) for i in range(100_000))
    item = run.run.config.update.add()
    item.key, item.value_json = "notes", json.dumps(big)
    summary = pb.Record()
    item = summary.summary.update.add()
    item.key, item.value_json = "val/bpd@16", "2.5"
    done = pb.Record()
    done.exit.exit_code = 0
    log, kinds = encode_log([r.SerializeToString() for r in (run, summary, done)])
    assert MIDDLE in kinds
    segment = tmp_path / "offline-run-20260101_000000-abc"
    segment.mkdir()
    (segment / "run-abc.wandb").write_bytes(log)
    got = read_offline_run(segment)
    assert (got["id"], got["group"], got["job_type"], got["finished"]) == ("abc", "sweep-1", "train", True)
    assert got["config"] == {"notes": big} and got["summary"] == {"val/bpd@16": 2.5}
