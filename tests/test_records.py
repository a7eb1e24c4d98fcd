"""The typed records decode and re-encode what earlier versions wrote, byte for byte.

The golden bytes below were written by partialstore before the records were
typed (two saves of a tree with every leaf kind, the seal, the manifest, and a
discard marker of another session). Each must decode to its typed class and
encode back to the very same bytes: a checkpoint written before must stay
readable, and a manifest merged from old records must be what it was.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from partialstore._arrays.descriptors import PackedLeaf, Zarr3Leaf, parse
from partialstore._commit.manifest import build_manifest
from partialstore._commit.records import (
    DiscardRecord,
    LeafEntry,
    SaveRecord,
    SealRecord,
    decode_manifest,
    decode_record,
)
from partialstore._commit.txlog import LogEntry
from partialstore.errors import CorruptCheckpointError

# fmt: off

SAVE_1 = (
    b'{"created":"2026-11-30T18:27:11.387746+00:00","custom_metadata":{"a":{"x":1}},"format":"'
    b'partialstore.log","kind":"save","leaves":[{"kind":"bool","path":[["key","flag"]],"value"'
    b':true},{"kind":"int","path":[["key","huge"]],"value":{"int":"0x400000000000000000"}},{"k'
    b'ind":"float","path":[["key","lr"]],"value":{"float":"inf"}},{"data":{"crc32c":1466709475'
    b',"dtype":"int64","format":"packed","nbytes":8,"offset":0,"path":"data/e1b1bc1a3efa4241be'
    b'7c06ea8ad0961d/packed-0000.bin","shape":[]},"kind":"np_scalar","path":[["key","lst"],["i'
    b'dx",0]]},{"kind":"float","path":[["key","lst"],["idx",1]],"value":1.5},{"kind":"str","pa'
    b'th":[["key","name"]],"value":"run"},{"kind":"float","path":[["key","nan"]],"value":{"bit'
    b's":"7ff8000000000000","float":"nan"}},{"kind":"none","path":[["key","none"]],"value":nul'
    b'l},{"data":{"checksum":"crc32c","chunks":[524296],"dtype":"bfloat16","format":"zarr3","p'
    b'ath":"data/e1b1bc1a3efa4241be7c06ea8ad0961d/a00001","shape":[524296],"storage_dtype":"bf'
    b'loat16"},"kind":"array","path":[["key","params"],["key","big"]]},{"data":{"crc32c":20208'
    b'83037,"dtype":"float32","format":"packed","nbytes":24,"offset":64,"path":"data/e1b1bc1a3'
    b'efa4241be7c06ea8ad0961d/packed-0000.bin","shape":[2,3]},"kind":"array","path":[["key","p'
    b'arams"],["key","w"]]},{"kind":"int","path":[["key","step"]],"value":7}],"nodes":[{"kind"'
    b':"dict","path":[],"type":"builtins.dict"},{"kind":"list","path":[["key","lst"]],"type":"'
    b'builtins.list"},{"kind":"dict","path":[["key","params"]],"type":"builtins.dict"}],"save_'
    b'id":"e1b1bc1a3efa4241be7c06ea8ad0961d","version":1,"writer":{"host":"vm","pid":7226,"wri'
    b'ter_id":null}}'
)

SAVE_2 = (
    b'{"created":"2026-11-30T18:27:11.390741+00:00","custom_metadata":{"a":{"y":2}},"format":"'
    b'partialstore.log","kind":"save","leaves":[{"data":{"crc32c":279473318,"dtype":"int8","fo'
    b'rmat":"packed","nbytes":2,"offset":0,"path":"data/a3103c8bb5cb4887aca252ef9e25996c/packe'
    b'd-0000.bin","shape":[2]},"kind":"array","path":[["key","params"],["key","b"]]},{"kind":"'
    b'int","path":[["key","step"]],"value":8}],"nodes":[{"kind":"dict","path":[],"type":"built'
    b'ins.dict"},{"kind":"dict","path":[["key","params"]],"type":"builtins.dict"}],"save_id":"'
    b'a3103c8bb5cb4887aca252ef9e25996c","version":1,"writer":{"host":"vm","pid":7226,"writer_i'
    b'd":null}}'
)

SEAL = (
    b'{"created":"2026-11-30T18:27:11.393385+00:00","finalize_id":"a15c2e82e6134c2eb3212812e0c'
    b'6e307","format":"partialstore.log","kind":"finalize","version":1,"writer":{"host":"vm","'
    b'pid":7226,"writer_id":null}}'
)

DISCARD = (
    b'{"created":"2026-11-30T18:27:15.445394+00:00","discard_id":"e214c445bad54a50bf07a29d2656'
    b'6e4b","format":"partialstore.log","kind":"discard","version":1,"writer":{"host":"vm","pi'
    b'd":7290,"writer_id":null}}'
)

MANIFEST = (
    b'{"format":"partialstore","version":1,"finalized":"2026-11-30T18:27:11.393385+00:00","fin'
    b'alize_id":"a15c2e82e6134c2eb3212812e0c6e307","finalized_by":{"host":"vm","pid":7226,"wri'
    b'ter_id":null},"seal":"log/00000003.json","custom_metadata":{"a":{"x":1,"y":2}},"saves":['
    b'{"log":"log/00000001.json","save_id":"e1b1bc1a3efa4241be7c06ea8ad0961d","created":"2026-'
    b'11-30T18:27:11.387746+00:00","num_leaves":11},{"log":"log/00000002.json","save_id":"a310'
    b'3c8bb5cb4887aca252ef9e25996c","created":"2026-11-30T18:27:11.390741+00:00","num_leaves":'
    b'2}],"nodes":[{"kind":"dict","path":[],"type":"builtins.dict"},{"kind":"list","path":[["k'
    b'ey","lst"]],"type":"builtins.list"},{"kind":"dict","path":[["key","params"]],"type":"bui'
    b'ltins.dict"}],"leaves":[{"kind":"bool","path":[["key","flag"]],"value":true},{"kind":"in'
    b't","path":[["key","huge"]],"value":{"int":"0x400000000000000000"}},{"kind":"float","path'
    b'":[["key","lr"]],"value":{"float":"inf"}},{"data":{"crc32c":1466709475,"dtype":"int64","'
    b'format":"packed","nbytes":8,"offset":0,"path":"data/e1b1bc1a3efa4241be7c06ea8ad0961d/pac'
    b'ked-0000.bin","shape":[]},"kind":"np_scalar","path":[["key","lst"],["idx",0]]},{"kind":"'
    b'float","path":[["key","lst"],["idx",1]],"value":1.5},{"kind":"str","path":[["key","name"'
    b']],"value":"run"},{"kind":"float","path":[["key","nan"]],"value":{"bits":"7ff80000000000'
    b'00","float":"nan"}},{"kind":"none","path":[["key","none"]],"value":null},{"data":{"check'
    b'sum":"crc32c","chunks":[524296],"dtype":"bfloat16","format":"zarr3","path":"data/e1b1bc1'
    b'a3efa4241be7c06ea8ad0961d/a00001","shape":[524296],"storage_dtype":"bfloat16"},"kind":"a'
    b'rray","path":[["key","params"],["key","big"]]},{"data":{"crc32c":2020883037,"dtype":"flo'
    b'at32","format":"packed","nbytes":24,"offset":64,"path":"data/e1b1bc1a3efa4241be7c06ea8ad'
    b'0961d/packed-0000.bin","shape":[2,3]},"kind":"array","path":[["key","params"],["key","w"'
    b']]},{"data":{"crc32c":279473318,"dtype":"int8","format":"packed","nbytes":2,"offset":0,"'
    b'path":"data/a3103c8bb5cb4887aca252ef9e25996c/packed-0000.bin","shape":[2]},"kind":"array'
    b'","path":[["key","params"],["key","b"]]},{"kind":"int","path":[["key","step"]],"value":8'
    b'}]}'
)

# fmt: on


@pytest.mark.parametrize(
    ("data", "kind"),
    [(SAVE_1, SaveRecord), (SAVE_2, SaveRecord), (SEAL, SealRecord), (DISCARD, DiscardRecord)],
    ids=["save-1", "save-2", "seal", "discard"],
)
def test_log_records_round_trip_byte_identical(data: bytes, kind: type) -> None:
    record = decode_record("ckpt.partial_save/log/x.json", data)
    assert type(record) is kind
    assert record.encode() == data


def test_manifest_round_trips_byte_identical() -> None:
    manifest = decode_manifest("ckpt/partialstore.json", MANIFEST)
    assert manifest.encode() == MANIFEST
    assert manifest.seal == "log/00000003.json"
    assert manifest.custom_metadata == {"a": {"x": 1, "y": 2}}
    assert [save.num_leaves for save in manifest.saves] == [11, 2]


@pytest.mark.parametrize("data", [SAVE_1, SAVE_2], ids=["save-1", "save-2"])
def test_a_save_built_from_typed_entries_encodes_as_before(data: bytes) -> None:
    # Decoded entries keep their stored JSON; a new save's entries have none
    # and are encoded field by field, which must give the same bytes.
    record = decode_record("ckpt.partial_save/log/x.json", data)
    assert isinstance(record, SaveRecord)
    rebuilt = dataclasses.replace(
        record,
        nodes=[dataclasses.replace(node, stored=None) for node in record.nodes],
        leaves=[dataclasses.replace(leaf, stored=None) for leaf in record.leaves],
    )
    assert all(leaf.stored is None for leaf in rebuilt.leaves)
    assert rebuilt.encode() == data


def test_merging_the_old_records_gives_the_old_manifest() -> None:
    saves = [LogEntry(1, decode_record("1", SAVE_1)), LogEntry(2, decode_record("2", SAVE_2))]
    seal = LogEntry(3, decode_record("3", SEAL))
    assert build_manifest(saves, seal, "ckpt.partial_save/log") == MANIFEST


def test_entries_and_descriptors_are_typed() -> None:
    record = decode_record("ckpt.partial_save/log/00000001.json", SAVE_1)
    assert isinstance(record, SaveRecord)
    by_name = {leaf.path[-1][1]: leaf for leaf in record.leaves}
    big, w, lr = by_name["big"], by_name["w"], by_name["lr"]
    assert isinstance(big.data, Zarr3Leaf) and big.data.checksum == "crc32c"
    assert isinstance(w.data, PackedLeaf) and (w.data.offset, w.data.shape) == (64, (2, 3))
    assert lr == LeafEntry((("key", "lr"),), "float", None, float("inf"))
    nan = by_name["nan"]
    assert nan.encode()["value"] == {"bits": "7ff8000000000000", "float": "nan"}
    assert by_name["huge"].value == 2**70
    # Each descriptor decodes and encodes back to its stored JSON form.
    for entry in json.loads(SAVE_1)["leaves"]:
        if "data" in entry:
            assert parse(entry["data"]).encode() == entry["data"]


def test_a_damaged_record_is_reported_with_its_key() -> None:
    body = json.loads(SAVE_2)
    body["leaves"][0]["data"]["path"] = "data/elsewhere/packed-0000.bin"
    with pytest.raises(CorruptCheckpointError, match=r"log/00000002\.json.*not in its save"):
        decode_record("ckpt.partial_save/log/00000002.json", json.dumps(body).encode())
    body = json.loads(SEAL)
    body["writer"] = "someone"
    with pytest.raises(CorruptCheckpointError, match="'writer' must be an object"):
        decode_record("ckpt.partial_save/log/00000003.json", json.dumps(body).encode())


def test_unknown_fields_are_ignored_and_not_written_back() -> None:
    body = json.loads(SEAL)
    body["added_later"] = [1]
    record = decode_record("ckpt.partial_save/log/00000003.json", json.dumps(body).encode())
    assert record.encode() == SEAL
