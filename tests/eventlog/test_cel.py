"""CEL-JSON: every native log converts to CEL and back without losing what replay needs."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest

from cima.errors import ParseError
from cima.eventlog import ccel, cel, ima, tcg
from cima.eventlog.replay import replay
from tests.vectors import manifest, path

TCG_FILES = [e["file"] for e in manifest("tcg")]
CCEL_FILES = [e["file"] for e in manifest("ccel") if e["expected"].get("format") == "crypto-agile"]
IMA_FILES = [e["file"] for e in manifest("ima")]


def _banks(log_algs: list[str]) -> list[str]:
    algs = []
    for a in log_algs:
        try:
            hashlib.new("sm3" if a == "sm3_256" else a)
        except ValueError:
            continue
        algs.append(a)
    return algs


@pytest.mark.parametrize("name", TCG_FILES)
def test_tcg_to_cel_and_back(name: str) -> None:
    data = path("tcg", name).read_bytes()
    log = tcg.parse(data)
    records = cel.from_json(cel.to_json(cel.from_measurements(log.events)))
    assert len(records) == len(log.events)
    # replay from CEL equals replay from the native log
    algs = log.algorithms()
    assert replay(records, algs).to_list() == replay(log.events, algs).to_list()
    # and the native bytes come back (the log area without its padding)
    assert cel.to_tcg_bytes(records) == data[: log.log_bytes]


@pytest.mark.parametrize("name", CCEL_FILES)
def test_ccel_to_cel_and_back(name: str) -> None:
    data = path("ccel", name).read_bytes()
    log = ccel.parse(data)
    records = cel.from_json(cel.to_json(cel.from_measurements(log.events)))
    doc = json.loads(cel.to_json(records))
    # TD registers are named by their CC measurement-register index ("imr"), never "pcr"
    assert all("pcr" not in r and 0 <= r["imr"] <= 4 for r in doc)
    algs = _banks(log.algorithms())
    assert replay(records, algs).to_list() == replay(log.events, algs).to_list()
    assert cel.to_tcg_bytes(records) == data[: log.log_bytes]


@pytest.mark.parametrize("name", IMA_FILES)
def test_ima_to_cel_and_back(name: str) -> None:
    data = path("ima", name).read_bytes()
    log = ima.parse_ascii(data)
    records = cel.from_json(cel.to_json(cel.from_measurements(log.entries)))
    for alg in ("sha1", "sha256", "sha384"):
        assert replay(records, [alg]).to_list() == replay(log.entries, [alg]).to_list()
    back = ima.parse_binary(cel.to_ima_binary(records))
    assert [e.to_ascii() for e in back.entries] == [e.to_ascii() for e in log.entries]


def _rec(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "recnum": 0,
        "pcr": 4,
        "digests": [{"hashAlg": "sha256", "digest": "00" * 32}],
        "content_type": "pcclient_std",
        "content": {"event_type": 13, "event_data": base64.b64encode(b"x").decode()},
    }
    base.update(over)
    return base


BAD_RECORDS = {
    "not-an-object": ([1], "expected an object"),
    "unknown-key": ([_rec(extra=1)], "'extra' is not a CEL record key"),
    "negative-recnum": ([_rec(recnum=-1)], "'recnum'"),
    "pcr-out-of-range": ([_rec(pcr=24)], "'pcr'"),
    "imr-out-of-range": ([{**_rec(), "pcr": None} | {"imr": 5}], "'pcr'"),
    "no-register": ([{k: v for k, v in _rec().items() if k != "pcr"}], "missing"),
    "register-disagrees": ([_rec(register="pcr5")], "names pcr4"),
    "unknown-alg": ([_rec(digests=[{"hashAlg": "md5", "digest": "00" * 16}])], "md5"),
    "short-digest": ([_rec(digests=[{"hashAlg": "sha256", "digest": "00" * 31}])], "31 bytes"),
    "bad-hex": ([_rec(digests=[{"hashAlg": "sha256", "digest": "zz"}])], "digests[0]"),
    "bad-content-type": ([_rec(content_type="x")], "'content_type'"),
    "bad-event-type": ([_rec(content={"event_type": -1, "event_data": ""})], "event_type"),
    "bad-base64": ([_rec(content={"event_type": 1, "event_data": "!!"})], "base64"),
    "ima-no-name": (
        [_rec(content_type="ima_template", content={"template_data": ""})],
        "template_name",
    ),
}


@pytest.mark.parametrize("name", BAD_RECORDS)
def test_bad_cel_names_the_record_and_key(name: str) -> None:
    doc, message = BAD_RECORDS[name]
    with pytest.raises(ParseError, match="CEL record 0") as info:
        cel.from_json(json.dumps(doc), source="log.json")
    assert message in str(info.value)
    assert "log.json" in str(info.value)


def test_not_json_names_the_line() -> None:
    with pytest.raises(ParseError, match="line 2"):
        cel.from_json('[\n{"recnum": }]')


def test_ima_record_computes_other_banks_and_violations() -> None:
    data = b"\x05\x00\x00\x00abcde"
    r = cel.CELRecord(
        0,
        "pcr10",
        (("sha1", hashlib.sha1(data).digest()),),
        "ima_template",
        {"template_name": "x", "template_data": data},
    )
    assert r.replay_digest("sha256") == hashlib.sha256(data).digest()
    v = cel.CELRecord(
        1,
        "pcr10",
        (("sha1", bytes(20)),),
        "ima_template",
        {"template_name": "x", "template_data": data},
    )
    assert v.replay_digest("sha384") == b"\xff" * 48


def test_sha384_ima_list_keeps_its_template_hash_algorithm() -> None:
    log = ima.parse_ascii(path("ccel", "evidence-api/ima_log.bin").read_bytes())
    records = cel.from_json(cel.to_json(cel.from_measurements(log.entries)))
    assert records[0].digests[0][0] == "sha384"
    assert replay(records, ["sha384"]).to_list() == replay(log.entries, ["sha384"]).to_list()
