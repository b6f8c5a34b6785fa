"""Secure aggregation (SecAgg, Bonawitz et al. CCS 2017): the arithmetic both sides share.

Each client of a round turns its release (its change from the broadcast, already scaled by its
weight) into integers and hides them under masks that cancel in the sum:

    y_k = Q(v_k) + PRG(b_k) + Σ_{j>k} PRG(s_kj) − Σ_{j<k} PRG(s_jk)   (mod 2³², per coordinate)

Q clips each coordinate to [−c, c] and maps it to [0, T] with stochastic rounding; b_k is the
client's own seed, s_kj the ECDH agreement of two clients' first keys. The coordinator sums the
survivors' y_k and, from Shamir shares the others hold, rebuilds every survivor's b_k (to remove
its self-mask) and every dropped client's first private key (to remove the pair masks it left in
the survivors' vectors). It then sees only Σ Q(v_k). With threshold t, any t clients' shares
rebuild a secret and t − 1 reveal nothing; an honest client never gives both shares of one peer.

What comes from libraries, never written here: key pairs, ECDH + HKDF and authenticated
encryption (Flower's ``flwr.common.secure_aggregation``, on ``cryptography``), Shamir's sharing
(Flower's, on PyCryptodome) and the share envelope. The masks are the ChaCha20 keystream of an
HKDF-derived key (``cryptography``), not Flower's ``pseudo_rand_gen``: that one folds its key into
a 32-bit seed of numpy's Mersenne Twister, so each mask has at most 2³² values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.core.flower_internals import (
    bytes_to_private_key,
    bytes_to_public_key,
    combine_shares,
    create_shares,
    decrypt,
    encrypt,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    public_key_to_bytes,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

TARGET_RANGE = 2**22  # T: levels of one client's coordinate; n·T < 2³² for n < 1024 clients
MAX_CLIENTS = 1023
EXTRA = 2  # coordinates after the release: the weight factor q_k = round(w_k·T), the clipped count
SEED_BYTES = 32
MAX_KEY_BYTES = 512  # a SECP384R1 public key in PEM is 215 bytes


class SecAggError(ValueError):
    """A stage message or reply that breaks the protocol (the text names the rule, never a value)."""


def share_bytes(secret_bytes: int) -> int:
    """The length of one Flower Shamir share of a secret: a 4-byte index and 16 bytes per padded chunk."""
    return 4 + 16 * (secret_bytes // 16 + 1)


PRIVATE_KEY_BYTES = len(private_key_to_bytes(generate_key_pairs()[0]))  # PKCS8 PEM of SECP384R1: fixed
B_SHARE_BYTES, SK_SHARE_BYTES = share_bytes(SEED_BYTES), share_bytes(PRIVATE_KEY_BYTES)
ENVELOPE_BYTES = len(encrypt(b"A" * 43 + b"=", bytes(20 + B_SHARE_BYTES + SK_SHARE_BYTES)))


def threshold_for(clients: int, configured: int) -> int:
    """Shares needed to rebuild a secret: the configured minimum, and always a majority (2t > n), so that
    no split of the clients lets a coordinator collect both shares of one honest client."""
    return max(configured, clients // 2 + 1)


# -- keys ------------------------------------------------------------------------------------
def new_keys() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    private, public = generate_key_pairs()
    return private, public_key_to_bytes(public)


def public_key(pem: object) -> ec.EllipticCurvePublicKey:
    """A peer's public key, only if it is a SECP384R1 key in PEM of a sane size."""
    if not isinstance(pem, bytes) or not 0 < len(pem) <= MAX_KEY_BYTES:
        raise SecAggError("a public key must be PEM bytes of at most 512")
    try:
        key = bytes_to_public_key(pem)
    except (ValueError, TypeError) as err:
        raise SecAggError("a public key does not parse") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SecAggError("a public key must be on SECP384R1")
    return key


def agreed_key(private: ec.EllipticCurvePrivateKey, peer_pem: bytes) -> bytes:
    return generate_shared_key(private, public_key(peer_pem))


def commitment(seed: bytes, nonce: str, node: int) -> bytes:
    """What a client publishes of its self-mask seed, so a rebuilt seed can be checked."""
    return hashlib.sha256(seed + nonce.encode() + node.to_bytes(8, "little")).digest()


def digest(share: bytes) -> bytes:
    """What a dealer publishes of each share it deals, so a holder's returned share can be checked."""
    return hashlib.sha256(share).digest()


# -- sharing -----------------------------------------------------------------------------------
def deal(
    seed: bytes, private: ec.EllipticCurvePrivateKey, threshold: int, holders: int
) -> tuple[list[bytes], list[bytes]]:
    """Shamir shares of the self-mask seed and of the first private key, one pair per holder (index = position + 1)."""
    return create_shares(seed, threshold, holders), create_shares(private_key_to_bytes(private), threshold, holders)


def seal(key: bytes, src: int, dst: int, b_share: bytes, sk_share: bytes) -> bytes:
    return encrypt(key, share_keys_plaintext_concat(src, dst, b_share, sk_share))


def open_envelope(key: bytes, token: object, src: int, dst: int) -> tuple[bytes, bytes]:
    """The two shares in a peer's envelope, or ``SecAggError`` (bad token, wrong ends, wrong lengths)."""
    if not isinstance(token, bytes) or len(token) != ENVELOPE_BYTES:
        raise SecAggError("an envelope has the wrong length")
    try:
        got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, token))
    except Exception as err:  # an InvalidToken, or a plaintext that does not split
        raise SecAggError("an envelope does not open") from err
    if (got_src, got_dst) != (src, dst) or len(b_share) != B_SHARE_BYTES or len(sk_share) != SK_SHARE_BYTES:
        raise SecAggError("an envelope holds the wrong shares")
    return b_share, sk_share


def share_index(share: bytes) -> int:
    return int.from_bytes(share[:4], "little")


def rebuilt_seed(shares: list[bytes], commit: bytes, nonce: str, node: int) -> bytes | None:
    """The self-mask seed from SHARES (any t), if it matches its commitment."""
    try:
        seed = combine_shares(shares)
    except Exception:  # noqa: BLE001 (PyCryptodome raises ValueError or IndexError on bad shares)
        return None
    return seed if len(seed) == SEED_BYTES and commitment(seed, nonce, node) == commit else None


def rebuilt_private_key(shares: list[bytes], public_pem: bytes) -> ec.EllipticCurvePrivateKey | None:
    """The first private key from SHARES, if its public key is the one the client published."""
    try:
        key = bytes_to_private_key(combine_shares(shares))
    except Exception:  # noqa: BLE001 (garbage does not parse)
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or public_key_to_bytes(key.public_key()) != public_pem:
        return None
    return key


# -- masks and quantization ---------------------------------------------------------------------
def keystream(key: bytes, context: bytes, count: int) -> np.ndarray:
    """COUNT uniform uint32 values from KEY for CONTEXT: ChaCha20 under an HKDF-SHA256 key of both."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedtune-secagg|" + context).derive(key)
    stream = Cipher(algorithms.ChaCha20(derived, bytes(16)), mode=None).encryptor().update(bytes(4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def self_mask(seed: bytes, nonce: str, node: int, count: int) -> np.ndarray:
    return keystream(seed, f"self|{nonce}|{node}".encode(), count)


def pair_mask(agreed: bytes, nonce: str, a: int, b: int, count: int) -> np.ndarray:
    """The mask two clients share; the lower id adds it, the higher subtracts it."""
    low, high = sorted((a, b))
    return keystream(agreed, f"pair|{nonce}|{low}|{high}".encode(), count)


def signed(node: int, peer: int, mask: np.ndarray) -> np.ndarray:
    """MASK as NODE adds it to its vector: as is below PEER's id, negated (mod 2³²) above."""
    return mask if node < peer else (np.uint32(0) - mask).astype(np.uint32)


def quantize(values: np.ndarray, clip: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """VALUES clipped to [−clip, clip] and mapped to [0, T] with unbiased stochastic rounding; (ints, clipped count)."""
    values = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > clip))
    scaled = (np.clip(values, -clip, clip) + clip) * (TARGET_RANGE / (2 * clip))
    low = np.floor(scaled)
    ints = low + (rng.random(scaled.shape) < scaled - low)
    return np.minimum(ints, TARGET_RANGE).astype(np.uint32), clipped


def weight_factor(weight: float) -> int:
    """q_k = round(w_k·T) for a weight in (0, 1]: both sides compute it, so the coordinator can check Σq."""
    return int(round(weight * TARGET_RANGE))


def masked_vector(
    release: np.ndarray, weight: float, clip: float, masks: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """What a client uploads: [Q(weight·release), q, clipped] plus every mask (mod 2³²); and the clipped count."""
    ints, clipped = quantize(weight * np.asarray(release, dtype=np.float64), clip, rng)
    vector = np.concatenate([ints, np.array([weight_factor(weight), clipped], dtype=np.uint32)])
    for mask in masks:
        vector += mask  # uint32 arithmetic wraps: mod 2³²
    return vector, clipped


@dataclass(frozen=True)
class SecureSum:
    """The unmasked sum of a round's survivors, read back into a weighted mean."""

    mean: np.ndarray  # Σ w_k·Δ_k / Σ w_k (to the quantization step)
    clipped: int  # coordinates the survivors clipped to ±c, summed
    clients: int


def read_sum(total: np.ndarray, clients: int, clip: float, expected_weight: int) -> SecureSum:
    """The mean release from the unmasked sum of CLIENTS' vectors, or ``SecAggError`` when the sum cannot be
    one of honest vectors: a coordinate outside [0, n·T], or weight factors that are not the assigned ones."""
    values, weight, clipped = total[:-EXTRA].astype(np.float64), int(total[-2]), int(total[-1])
    if np.any(values > clients * TARGET_RANGE) or weight != expected_weight or clipped > clients * len(values):
        raise SecAggError("the unmasked sum is outside what honest clients can send")
    mean = (values * (2 * clip / TARGET_RANGE) - clients * clip) / (weight / TARGET_RANGE)
    return SecureSum(mean, clipped, clients)
