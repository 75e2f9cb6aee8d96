from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from flowkeeper.errors import ConfigurationError, SignatureError
from flowkeeper.signing import (
    SIGNATURE_HEADER,
    RequestSigner,
    sign_request,
    verify_request,
)

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "signing.json").read_text())[
    "vectors"
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def independent_signature(key: str, method: str, path: str, body: bytes, ts: int) -> str:
    """The algorithm as documented in flowkeeper.signing, written without itsdangerous."""
    derived = hmac.new(key.encode(), b"flowkeeper.v1", hashlib.sha256).digest()
    ts_text = _b64(ts.to_bytes((ts.bit_length() + 7) // 8, "big"))
    digest = hashlib.sha256(body).hexdigest()
    message = f"v1\n{method}\n{path}\n{digest}.{ts_text}".encode()
    return ts_text + "." + _b64(hmac.new(derived, message, hashlib.sha256).digest())


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['method']} {v['path']}")
def test_vectors_are_reproduced_by_the_library(vector: dict) -> None:
    headers = sign_request(
        vector["key"],
        method=vector["method"],
        path=vector["path"],
        body=vector["body"].encode(),
        timestamp=vector["timestamp"],
    )
    assert headers[SIGNATURE_HEADER] == vector["header"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['method']} {v['path']}")
def test_vectors_match_the_documented_algorithm(vector: dict) -> None:
    assert (
        independent_signature(
            vector["key"],
            vector["method"],
            vector["path"],
            vector["body"].encode(),
            vector["timestamp"],
        )
        == vector["header"]
    )


def _sign(body: bytes = b'{"run_id":"x"}', path: str = "/api/flowkeeper/", **kw: object) -> str:
    return sign_request("k1-secret", method="POST", path=path, body=body, **kw)[SIGNATURE_HEADER]  # type: ignore[arg-type]


def test_valid_signature_verifies() -> None:
    header = _sign()
    verify_request(
        "k1-secret",
        method="POST",
        paths=["/api/flowkeeper/"],
        body=b'{"run_id":"x"}',
        header=header,
    )


def test_tampered_body_is_refused() -> None:
    header = _sign()
    with pytest.raises(SignatureError) as err:
        verify_request(
            "k1-secret",
            method="POST",
            paths=["/api/flowkeeper/"],
            body=b'{"run_id":"y"}',
            header=header,
        )
    assert err.value.code == "invalid_signature"
    assert "altered" in str(err.value)


def test_signature_for_another_path_is_refused() -> None:
    header = _sign(path="/api/flowkeeper/")
    with pytest.raises(SignatureError):
        verify_request(
            "k1-secret",
            method="POST",
            paths=["/api/flowkeeper/tick"],
            body=b'{"run_id":"x"}',
            header=header,
        )


def test_method_is_bound() -> None:
    header = _sign()
    with pytest.raises(SignatureError):
        verify_request(
            "k1-secret",
            method="PUT",
            paths=["/api/flowkeeper/"],
            body=b'{"run_id":"x"}',
            header=header,
        )


def test_expired_signature_is_refused() -> None:
    header = _sign(timestamp=int(time.time()) - 301)
    with pytest.raises(SignatureError) as err:
        verify_request(
            "k1-secret",
            method="POST",
            paths=["/api/flowkeeper/"],
            body=b'{"run_id":"x"}',
            header=header,
        )
    assert err.value.code == "expired_signature"


def test_signature_from_the_future_is_refused_beyond_skew() -> None:
    body = b'{"run_id":"x"}'
    ok = _sign(body, timestamp=int(time.time()) + 10)
    verify_request("k1-secret", method="POST", paths=["/api/flowkeeper/"], body=body, header=ok)
    bad = _sign(body, timestamp=int(time.time()) + 120)
    with pytest.raises(SignatureError) as err:
        verify_request(
            "k1-secret", method="POST", paths=["/api/flowkeeper/"], body=body, header=bad
        )
    assert err.value.code == "future_signature"


def test_unknown_key_is_refused() -> None:
    header = sign_request("other-key", method="POST", path="/", body=b"")[SIGNATURE_HEADER]
    with pytest.raises(SignatureError) as err:
        verify_request("k1-secret", method="POST", paths=["/"], body=b"", header=header)
    assert err.value.code == "invalid_signature"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        ("abc", "malformed_signature"),
        ("a.b.c", "malformed_signature"),
        ("!!!.sig", "malformed_signature"),
        ("arE7gA.\u00e9t\u00e9", "malformed_signature"),  # non-ASCII: refused, not a crash
        ("\xff\xfe.abc", "malformed_signature"),
        ("A" * 40 + ".sig", "malformed_signature"),  # a timestamp no clock makes
    ],
)
def test_malformed_headers(header: str | None, code: str) -> None:
    with pytest.raises(SignatureError) as err:
        verify_request("k1-secret", method="POST", paths=["/"], body=b"", header=header)
    assert err.value.code == code


def test_key_rotation_first_signs_all_verify() -> None:
    old = RequestSigner(["old-key"])
    rotated = RequestSigner(["new-key", "old-key"])
    body = b"{}"
    by_old = old.sign(method="POST", path="/", body=body)
    by_new = rotated.sign(method="POST", path="/", body=body)
    rotated.verify(method="POST", paths=["/"], body=body, headers=by_old)
    rotated.verify(method="POST", paths=["/"], body=body, headers=by_new)
    # The new key signs: a verifier that only knows the old key refuses it.
    with pytest.raises(SignatureError):
        old.verify(method="POST", paths=["/"], body=body, headers=by_new)


def test_empty_key_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="FLOWKEEPER_SIGNING_KEY"):
        RequestSigner("  ")
    with pytest.raises(ConfigurationError):
        RequestSigner([])


def test_any_of_several_paths_verifies() -> None:
    body = b"{}"
    header = sign_request("k", method="POST", path="/api/flowkeeper/", body=body)[SIGNATURE_HEADER]
    verify_request("k", method="POST", paths=["/", "/api/flowkeeper/"], body=body, header=header)
