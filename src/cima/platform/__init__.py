"""The only code that touches hardware interfaces: TPM, TDX, securityfs, and a software stand-in."""
