"""A TD's own log against its own signed quote: the CCEL replays to the quoted RTMRs."""

from __future__ import annotations

from cima.eventlog import ccel, formats, ima
from cima.eventlog.replay import replay_and_compare
from cima.evidence import tdx
from cima.evidence.reportdata import check_tdx_binding
from tests.vectors import path


def _quoted(quote: tdx.TDXQuote, names: list[str]) -> dict[tuple[str, str], bytes]:
    regs = quote.body.registers()
    return {(n, "sha384"): regs[n] for n in names}


def test_cos_ccel_replays_to_its_quote_and_the_quote_binds_the_nonce() -> None:
    quote = tdx.TDXQuote.from_bytes(path("ccel", "go-tdx-guest/cos-113-tdx-quote.dat").read_bytes())
    tdx.verify(quote)  # signed up to the Intel root
    nonce = path("ccel", "go-tdx-guest/nonce.dat").read_bytes()
    check_tdx_binding(quote.report_data, nonce, b"", mode="raw")
    log = ccel.parse(path("ccel", "go-tdx-guest/ccel_data.dat").read_bytes())
    result = replay_and_compare(log.events, _quoted(quote, ["rtmr0", "rtmr1", "rtmr2", "rtmr3"]))
    assert result.ok, result.mismatches


def test_evidence_api_ccel_plus_ima_replays_to_its_quote() -> None:
    quote = tdx.TDXQuote.from_bytes(path("tdx-quote", "evidence-api/quote.bin").read_bytes())
    boot = ccel.parse(path("ccel", "evidence-api/ccel_data.bin").read_bytes())
    runtime = ima.parse_ascii(path("ccel", "evidence-api/ima_log.bin").read_bytes())
    logs = [
        formats.LoadedLog("ccel", None, boot.events, boot),
        formats.LoadedLog("ima-ascii", None, runtime.entries, runtime),
    ]
    expected = _quoted(quote, ["rtmr0", "rtmr1", "rtmr2", "rtmr3"])
    assert replay_and_compare(formats.combined(logs), expected).ok
    # the boot log alone does not explain rtmr2: the IMA entry is needed
    alone = replay_and_compare(boot.events, expected)
    assert [c.register for c in alone.mismatches] == ["rtmr2"]
