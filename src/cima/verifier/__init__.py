"""The verifier: reference values, appraisal, the store and the HTTP service.

- :mod:`cima.verifier.reference`: reference values (the YAML file, creation from
  known-good bundles);
- :mod:`cima.verifier.appraise`: the six steps of DESIGN.md section 9, producing
  an :class:`~cima.verifier.result.AttestationResult`, incrementally from an
  earlier :class:`~cima.verifier.appraise.AppraisalState`;
- :mod:`cima.verifier.result`: the result, its submodules and failures, the
  reconstructed environment, the EAR JWT;
- :mod:`cima.verifier.imasig`: IMA file signatures (``security.ima``, versions 2
  and 3) and their keys;
- :mod:`cima.verifier.modsig`: appended PKCS#7 signatures (``ima-modsig``).

The names below are imported on first use, so that ``import cima.verifier.store``
does not load the appraisal machinery. The function is
``cima.verifier.appraise.appraise`` (``cima.verifier.appraise`` is its module).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AppraisalState",
    "AttestationResult",
    "ReferenceValues",
    "create_references",
    "load_references",
    "verify_jwt",
]

_WHERE = {
    "AppraisalState": "cima.verifier.appraise",
    "AttestationResult": "cima.verifier.result",
    "verify_jwt": "cima.verifier.result",
    "ReferenceValues": "cima.verifier.reference",
    "create_references": "cima.verifier.reference",
    "load_references": "cima.verifier.reference",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cima.verifier' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
