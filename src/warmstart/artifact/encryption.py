"""Encryption at rest: the key that seals what an artifact holds of process memory (image/codec.py seals it).

One symmetric key, 32 random bytes, created on first use as `images.key` (0600) in WARMSTART_KEY_DIR beside
the signing key; WARMSTART_ENCRYPTION_KEY names another file instead (a mounted Kubernetes Secret), and
WARMSTART_DECRYPTION_KEYS names older keys (files, or directories of them) still accepted for restore
(rotation). Each artifact gets a key of its own, derived from that one with HKDF-SHA256 over a random salt,
so no two artifacts share a key and the manifest need only carry the salt and the master key's id (neither
is secret). AES-256-GCM, from the `cryptography` package."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import AEADEncryptionContext, Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from warmstart import config, linux, paths
from warmstart.artifact.manifest import Encryption
from warmstart.errors import ArtifactError, EnvironmentProblem, ImageError

KEY_NAME = "images.key"
ALGORITHM: Final = "aes-256-gcm"
_INFO = b"warmstart artifact images v1"
_KEY_BYTES = 32


def key_id(master: bytes) -> str:
    return hashlib.sha256(b"warmstart key id\0" + master).hexdigest()[:16]


@dataclass(frozen=True)
class ImageKey:
    """An artifact's own key: seals and opens chunks. Nonces are the caller's (unique per chunk)."""

    aead: AESGCM
    raw: bytes = field(repr=False)  # for `sealer`, which AESGCM does not offer

    def sealer(self, nonce: bytes, aad: bytes) -> AEADEncryptionContext:
        """`seal` in pieces, the same bytes: a chunk sealed a cache-sized piece at a time (image/inplace.py)."""
        ctx = Cipher(algorithms.AES(self.raw), modes.GCM(nonce)).encryptor()
        ctx.authenticate_additional_data(aad)
        return ctx

    def seal(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return self.aead.encrypt(nonce, data, aad)

    def unmasker(self, nonce: bytes, offset: int) -> CipherContext:
        """Turns a chunk's ciphertext from `offset` (a multiple of 16) back into its plaintext, unauthenticated:
        AES-GCM is a counter mode. Only for what this process just sealed: the planner's samples of it, and
        undoing the seal (image/inplace.py)."""
        block = 2 + offset // 16  # GCM's first data block is counter 2 (1 masks the tag)
        return Cipher(algorithms.AES(self.raw), modes.CTR(nonce + block.to_bytes(4, "big"))).decryptor()

    def open_into(self, nonce: bytes, data: memoryview, aad: bytes, out: memoryview, what: str) -> None:
        """`open`, into `out` (len(data) - 16 bytes)."""
        try:
            self.aead.decrypt_into(nonce, data, aad, out)
        except InvalidTag:
            raise ImageError(f"{what} fails its authentication (corrupt, tampered, or sealed with another key)") \
                from None

    def open(self, nonce: bytes, data: bytes, aad: bytes, what: str) -> bytes:
        try:
            return self.aead.decrypt(nonce, data, aad)
        except InvalidTag:
            raise ImageError(f"{what} fails its authentication (corrupt, tampered, or sealed with another key)") \
                from None


def derive(master: bytes, salt: bytes) -> ImageKey:
    raw = HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=salt, info=_INFO).derive(master)
    return ImageKey(AESGCM(raw), raw)


def _read_key(path: Path) -> bytes:
    """32 bytes, hex-encoded, from a private file of this user."""
    text = paths.read_private(path, "encryption key", f"fix {path}, or unset the variable that names it").strip()
    try:
        key = bytes.fromhex(text.decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != _KEY_BYTES:
        raise EnvironmentProblem(f"{path} is not an encryption key (64 hex digits)",
                                 f"make one with `openssl rand -hex 32 > {path}`, or let a checkpoint make one")
    return key


def _configured(path: Path) -> bytes:
    return _read_key(path.resolve())  # a Secret's files are symlinks into a timestamped directory


def master_key() -> bytes:
    """The key new artifacts are sealed with: WARMSTART_ENCRYPTION_KEY's, else this host's, made on first use."""
    s = config.current()
    if s.encryption_key:
        return _configured(s.encryption_key)
    d = paths.private_dir(s.key_dir, "WARMSTART_KEY_DIR")
    path = d / KEY_NAME
    if not os.path.lexists(path):
        try:
            linux.write_new(path, os.urandom(_KEY_BYTES).hex().encode() + b"\n", 0o600)
        except FileExistsError:
            pass  # another process made it first: use that one
    return _read_key(path)


def _known_keys() -> dict[str, bytes]:
    s = config.current()
    found: list[bytes] = []
    if s.encryption_key:
        found.append(_configured(s.encryption_key))
    elif os.path.lexists(s.key_dir / KEY_NAME):
        found.append(_read_key(s.key_dir / KEY_NAME))
    for p in s.decryption_keys:  # files, or directories of them (a mounted Secret: its dot-entries are its own)
        found += [_configured(f) for f in sorted(p.iterdir()) if not f.name.startswith(".")] if p.is_dir() \
            else [_configured(p)]
    return {key_id(k): k for k in found}


def new_artifact_key() -> tuple[Encryption, ImageKey]:
    master, salt = master_key(), os.urandom(16)
    return Encryption(algorithm=ALGORITHM, key=key_id(master), salt=salt.hex()), derive(master, bytes(salt))


def artifact_key(artifact: Path, enc: Encryption) -> ImageKey:
    """The key an artifact's images were sealed with, refused (before anything starts) where this host lacks it."""
    master = _known_keys().get(enc.key)
    if master is None:
        raise ArtifactError(f"artifact {artifact} is encrypted with key {enc.key}, which this host does not have",
                            "set WARMSTART_ENCRYPTION_KEY (or WARMSTART_DECRYPTION_KEYS) to that key's file, "
                            "as on the host that checkpointed it (docs/security.md)")
    return derive(master, bytes.fromhex(enc.salt))
