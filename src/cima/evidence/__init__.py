"""Signed reports (TPM quotes, TDX quotes), their verification, and evidence bundles. Pure."""
