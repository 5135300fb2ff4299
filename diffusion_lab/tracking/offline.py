"""Reading a W&B offline run back (group, tags, config, summary) from its ``run-<id>.wandb`` log, so tables can be
built from W&B's own record without the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_LOG_BLOCK = 32 * 1024  # the W&B run log is a LevelDB-style log: 32 KiB blocks of chunked records
_LOG_MAGIC = b":W&B"


def _log_records(path: Path) -> Iterable[bytes]:
    """The records of a W&B ``run-<id>.wandb`` log, reassembled from their chunks (checksums verified)."""
    import struct
    import zlib

    data = path.read_bytes()
    if len(data) < 7:
        return  # just created: not even the header is written yet (an unfinished run)
    if data[:4] != _LOG_MAGIC:
        raise ValueError(f"{path} is not a W&B run log (it does not start with {_LOG_MAGIC!r})")
    pos, record = 7, b""  # 7-byte file header: magic, 2-byte version magic, 1-byte version
    while pos + 7 <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            break  # a run still being written (or killed) ends in a partial chunk
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # FULL/FIRST start, MIDDLE/LAST continue
        if kind in (1, 4):
            yield record


def _apply_items(target: dict[str, Any], items: Iterable[Any]) -> None:
    for item in items:
        node, keys = target, [item.key] if item.key else list(item.nested_key)
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> dict[str, Any]:
    """A W&B offline run (its ``run-<id>.wandb`` log, its directory, or a ``wandb/`` directory holding one run)
    as ``{"id", "group", "job_type", "tags", "config", "summary", "dir", "finished"}``: what the W&B UI shows once
    synced. ``finished`` is False until the log holds the run's exit record: W&B's writer may still be flushing
    it after ``run.finish()`` returns, or the run was killed; what is read then may be partial."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    logs = [path]
    if path.is_dir():
        logs = sorted(path.glob("run-*.wandb")) or sorted(path.glob("offline-run-*/run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"expected one W&B run log (run-*.wandb) in {path}, found {len(logs)}")
    log = logs[0]
    # The id is also the log's name (run-<id>.wandb): a run killed before its first flush is still one run.
    run: dict[str, Any] = {"id": log.stem.removeprefix("run-"), "group": "", "job_type": "", "tags": [],
                           "config": {}, "summary": {}, "dir": str(log.parent), "finished": False}  # fmt: skip
    for raw in _log_records(log):
        record = pb.Record()  # type: ignore[attr-defined]
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"id": record.run.run_id, "group": record.run.run_group, "job_type": record.run.job_type}
            run["tags"] = list(record.run.tags)
            _apply_items(run["config"], record.run.config.update)
        elif kind == "config":
            _apply_items(run["config"], record.config.update)
        elif kind == "summary":
            _apply_items(run["summary"], record.summary.update)
            for item in record.summary.remove:
                node, keys = run["summary"], [item.key] if item.key else list(item.nested_key)
                for key in keys[:-1]:
                    node = node.get(key, {})
                node.pop(keys[-1], None)
        elif kind == "exit":
            run["finished"] = True
    run["config"].pop("_wandb", None)
    return run
