"""``cima demo``: the whole chain on this machine, as ``make demo`` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cima.cli.main import main
from cima.platform.swtpm import available
from cima.verifier.reference import load_references


@pytest.mark.parametrize("platform", ["tpm", "software"])
def test_demo_chain_affirms_then_contraindicates(
    platform: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if platform == "tpm" and available():
        pytest.skip(reason=str(available()))
    code = main(["demo", "--platform", platform, "--keep", str(tmp_path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert doc["vectors"]["ok"] is True
    chain = doc["chain"]
    assert chain["run2"]["status"] == "affirming"
    assert chain["run3"]["status"] == "contraindicated"
    # the change is named: the restarted process and its new command line
    reasons = " ".join(f["reason"] for f in chain["run3"]["failures"])
    assert "/usr/bin/containerd" in reasons and "--log-level debug" in reasons
    assert chain["run3"]["submods"]["system"] == "contraindicated"
    assert (tmp_path / "references.yaml").exists()
    if platform == "tpm":
        # On a TPM the attestation key is trusted through the EK certificate: the
        # references list no key.
        assert chain["enrolled"]["how"].startswith("enrolled by EK certificate")
        assert chain["run2"]["attestation_key"] == chain["enrolled"]["how"]
        refs = load_references((tmp_path / "references.yaml").read_text())
        assert refs.trusted_keys == []
    else:  # trusted by registration: the references list the key of run 1's bundle
        assert "enrolled" not in chain
        assert chain["run2"]["attestation_key"] == "bundle 0"
