"""Artifact signatures: Ed25519 over the manifest's exact bytes, which name every file of the artifact by its
SHA-256, so one signature covers the whole artifact.

The signing key is created on first use in WARMSTART_KEY_DIR (default /var/lib/warmstart/keys): `artifact.key`
(private, 0600) and `artifact.pub`, in a directory that only its owner may write. A restore trusts that public
key and every public key named by WARMSTART_TRUSTED_KEYS (files, or directories of `*.pub`), so several nodes
share artifacts by sharing one key pair (a Kubernetes Secret) or by trusting each other's public keys.
Nothing is followed through a symlink, and a key others could write is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from warmstart import config, linux, paths
from warmstart.artifact.manifest import MANIFEST_NAME
from warmstart.errors import ArtifactError, EnvironmentProblem

SIGNATURE_NAME = "manifest.sig"
PRIVATE_NAME = "artifact.key"
PUBLIC_NAME = "artifact.pub"
_UNSIGNED_FIX = "checkpoint it again on a host whose key this one trusts (or pass --insecure-unsigned to accept it)"


def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_private(path: Path) -> bytes:
    return paths.read_private(path, "signing key", f"remove {path} (a new key is made on next use) or fix its "
                              "permissions")


def _key_dir() -> Path:
    return paths.private_dir(config.current().key_dir, "WARMSTART_KEY_DIR")


def _configured_key(path: Path) -> Ed25519PrivateKey:
    """The key file an administrator named (WARMSTART_SIGNING_KEY). Kubernetes mounts a Secret's files as
    symlinks into a timestamped directory, so this one path is resolved first; the file it names must still be
    a private file of this user."""
    return _parse_private(path.resolve(), _read_private(path.resolve()))


def _parse_private(path: Path, pem: bytes) -> Ed25519PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except ValueError:
        loaded = None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise EnvironmentProblem(f"{path} is not an Ed25519 private key in PEM",
                                 f"make one with a checkpoint on any host (WARMSTART_KEY_DIR/{PRIVATE_NAME})")
    return loaded


def signing_key() -> Ed25519PrivateKey:
    """The key artifacts are signed with: WARMSTART_SIGNING_KEY's, else this host's, created on first use."""
    configured = config.current().signing_key
    if configured:
        return _configured_key(configured)
    d = _key_dir()
    private = d / PRIVATE_NAME
    if not os.path.lexists(private):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            linux.write_new(private, pem, 0o600)
        except FileExistsError:
            pass  # another process made it first: use that one
    loaded = _parse_private(private, _read_private(private))
    public = d / PUBLIC_NAME
    if not os.path.lexists(public):
        linux.write_new(public, loaded.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return loaded


def _load_public(path: Path) -> Ed25519PublicKey | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        key = serialization.load_pem_public_key(os.read(fd, 1 << 16))
    except ValueError:
        return None
    finally:
        os.close(fd)
    return key if isinstance(key, Ed25519PublicKey) else None


def trusted_keys() -> dict[str, Ed25519PublicKey]:
    """fingerprint -> key: this host's public key (if it has one) and every one WARMSTART_TRUSTED_KEYS names."""
    s = config.current()
    paths = [s.key_dir / PUBLIC_NAME]
    for p in s.trusted_keys:
        paths += sorted(p.glob("*.pub")) if p.is_dir() else [p]
    keys = [k for k in (_load_public(p) for p in paths) if k is not None]
    if s.signing_key:
        keys.append(_configured_key(s.signing_key).public_key())
    return {fingerprint(k): k for k in keys}


def sign(manifest_bytes: bytes) -> bytes:
    """The signature file's content for these manifest bytes."""
    key = signing_key()
    sig = key.sign(manifest_bytes)
    return json.dumps({"algorithm": "ed25519", "key": fingerprint(key.public_key()),
                       "signature": base64.b64encode(sig).decode()}).encode()


def signer(artifact: Path) -> str | None:
    """The fingerprint of the key that signed the artifact, once its signature is checked against the manifest;
    None for an unsigned artifact. Raises ArtifactError for a wrong signature or a key this host does not trust."""
    sig_path, mpath = artifact / SIGNATURE_NAME, artifact / MANIFEST_NAME
    try:
        body = json.loads(_read_small(sig_path))
        fp, sig = str(body["key"]), base64.b64decode(str(body["signature"]), validate=True)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ArtifactError(f"{sig_path} is corrupt", "copy the artifact again or checkpoint again") from None
    key = trusted_keys().get(fp)
    if key is None:
        raise ArtifactError(f"artifact {artifact} is signed by key {fp}, which this host does not trust",
                            "add that key's artifact.pub to WARMSTART_TRUSTED_KEYS, or " + _UNSIGNED_FIX)
    try:
        key.verify(sig, _read_small(mpath, limit=64 << 20))
    except (InvalidSignature, OSError, ValueError):
        raise ArtifactError(f"{mpath} does not match its signature (corrupt or tampered)",
                            "copy the artifact again or checkpoint again") from None
    return fp


def check(artifact: Path, insecure_unsigned: bool) -> str | None:
    """Refuse an artifact whose signature is wrong, or that is unsigned unless the caller accepts that."""
    fp = signer(artifact)
    if fp is None and not (insecure_unsigned or config.current().insecure_unsigned):
        raise ArtifactError(f"artifact {artifact} is not signed, so nothing vouches for the memory it would run",
                            _UNSIGNED_FIX)
    return fp


def _read_small(path: Path, limit: int = 1 << 16) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data
