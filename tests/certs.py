"""Test certificates: a CA of the test's own and a certificate for 127.0.0.1 signed by it (openssl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def make_certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(CA, certificate for 127.0.0.1 signed by it, key), written under `tmp_path`; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    run = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*run, "-keyout", tmp_path / "ca.key", "-out", ca, "-subj", "/CN=eg-test-ca"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", tmp_path / "c.csr",
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    subprocess.run(["openssl", "x509", "-req", "-in", tmp_path / "c.csr", "-CA", ca, "-CAkey", tmp_path / "ca.key",
                    "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", ext], check=True, capture_output=True)
    return ca, cert, key
