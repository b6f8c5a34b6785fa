"""A client's side of secure aggregation (core/secagg.py): four stages of one round's attempt.

    setup       make two key pairs and a self-mask seed; publish the public keys and the seed's commitment
    share-keys  Shamir-share the seed and the first private key among the attempt's clients, each pair
                of shares sealed for its holder (ECDH of the second keys)
    train       open the peers' envelopes, train, and upload the masked release (client_app.py)
    unmask      give the coordinator seed shares of the clients that uploaded and key shares of those that
                did not: never both of one peer

Secrets live in this process only (``_ATTEMPTS``, one open attempt per node), never in Flower's
Context, checkpoints or logs, and are dropped when the attempt ends or a new one starts. Every
stage message is checked first (order, nonce, lists): the coordinator may be curious, and an
instruction that breaks a rule is answered with an error, not followed.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord

from fedtune.core import secagg
from fedtune.core.secagg import SecAggError


@dataclass
class Attempt:
    node: int
    nonce: str
    threshold: int
    clip: float
    sk1: ec.EllipticCurvePrivateKey
    sk2: ec.EllipticCurvePrivateKey
    pk1: bytes
    pk2: bytes
    seed: bytes = field(default_factory=lambda: secrets.token_bytes(secagg.SEED_BYTES))
    stage: str = "setup"
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # share-keys: node -> (pk1, pk2)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # dealer -> (seed share, key share)
    peers: list[int] = field(default_factory=list)  # the clients whose pair masks this upload carries


_ATTEMPTS: dict[int, Attempt] = {}


def _open(node: int, config: ConfigRecord, stage: str) -> Attempt:
    """The node's attempt that CONFIG continues at STAGE (``SecAggError``: out of order or stale)."""
    attempt = _ATTEMPTS.get(node)
    if attempt is None or config.get("secagg-nonce") != attempt.nonce or attempt.stage != stage:
        _ATTEMPTS.pop(node, None)
        raise SecAggError(f"secure aggregation: a {stage} message out of order")
    return attempt


def _ints(config: ConfigRecord, key: str) -> list[int]:
    values = config.get(key)
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SecAggError(f"secure aggregation: '{key}' must be a list of node ids")
    if len(set(values)) != len(values):
        raise SecAggError(f"secure aggregation: '{key}' names a node twice")
    return values


def setup(node: int, config: ConfigRecord) -> ConfigRecord:
    nonce, threshold, clip = config.get("secagg-nonce"), config.get("threshold"), config.get("clip")
    if not (isinstance(nonce, str) and len(nonce) == 32 and isinstance(threshold, int) and threshold >= 3):
        raise SecAggError("secure aggregation: setup needs a nonce and a threshold of at least 3")
    if not (isinstance(clip, float) and 0.0 < clip < 1e6):
        raise SecAggError("secure aggregation: setup needs a clip range above 0")
    (sk1, pk1), (sk2, pk2) = secagg.new_keys(), secagg.new_keys()
    attempt = Attempt(node, nonce, threshold, clip, sk1, sk2, pk1, pk2, stage="share-keys")
    _ATTEMPTS[node] = attempt  # a new attempt ends the node's previous one, and drops its secrets
    return ConfigRecord({"pk1": pk1, "pk2": pk2, "commit": secagg.commitment(attempt.seed, nonce, node)})


def share_keys(node: int, config: ConfigRecord) -> ConfigRecord:
    attempt = _open(node, config, "share-keys")
    nodes = _ints(config, "nodes")
    pk1s, pk2s = config.get("pk1"), config.get("pk2")
    if not (isinstance(pk1s, list) and isinstance(pk2s, list) and len(pk1s) == len(pk2s) == len(nodes)):
        raise SecAggError("secure aggregation: one pair of keys per node")
    if node not in nodes or (pk1s[nodes.index(node)], pk2s[nodes.index(node)]) != (attempt.pk1, attempt.pk2):
        raise SecAggError("secure aggregation: this client's keys are not among the shared ones")
    if len(nodes) < attempt.threshold or 2 * attempt.threshold <= len(nodes):
        raise SecAggError("secure aggregation: the threshold must be a majority of at least 3 of the clients")
    for key in pk1s + pk2s:
        secagg.public_key(key)
    if len(set(pk1s + pk2s)) != 2 * len(nodes):
        raise SecAggError("secure aggregation: two clients share a key")
    attempt.keys = {n: (p1, p2) for n, p1, p2 in zip(nodes, pk1s, pk2s)}
    seeds, keys = secagg.deal(attempt.seed, attempt.sk1, attempt.threshold, len(nodes))
    dsts, envelopes, b_digests, sk_digests = [], [], [], []
    for index, peer in enumerate(nodes):
        b_digests.append(secagg.digest(seeds[index]))
        sk_digests.append(secagg.digest(keys[index]))
        if peer == node:
            attempt.held[node] = (seeds[index], keys[index])
            continue
        dsts.append(peer)
        envelopes.append(
            secagg.seal(secagg.agreed_key(attempt.sk2, pk2s[index]), node, peer, seeds[index], keys[index])
        )
    attempt.stage = "train"
    return ConfigRecord({"dsts": dsts, "envelopes": envelopes, "b-digests": b_digests, "sk-digests": sk_digests})


def open_envelopes(node: int, config: ConfigRecord) -> list[int]:
    """Take the shares the peers sealed for this client; the peers whose envelope did not open (kept out)."""
    attempt = _open(node, config, "train")
    srcs, envelopes, peers = _ints(config, "srcs"), config.get("envelopes"), _ints(config, "peers")
    if not isinstance(envelopes, list) or len(envelopes) != len(srcs):
        raise SecAggError("secure aggregation: one envelope per source")
    if node not in peers or not set(peers) <= set(attempt.keys) or len(peers) < attempt.threshold:
        raise SecAggError("secure aggregation: the peers must be at least threshold clients of the shared keys")
    if not set(srcs) <= set(peers) - {node}:
        raise SecAggError("secure aggregation: an envelope from a client that is not a peer")
    bad = []
    for src, envelope in zip(srcs, envelopes):
        try:
            attempt.held[src] = secagg.open_envelope(
                secagg.agreed_key(attempt.sk2, attempt.keys[src][1]), envelope, src, node
            )
        except SecAggError:
            bad.append(src)
    attempt.peers = sorted(peers)
    return bad


def masked_release(node: int, release: np.ndarray, weight: float, config: ConfigRecord) -> tuple[np.ndarray, int]:
    """RELEASE (this client's change, flat) as its masked upload; (uint32 vector, coordinates clipped)."""
    attempt = _open(node, config, "train")
    if not (isinstance(weight, float) and 0.0 < weight <= 1.0):
        raise SecAggError("secure aggregation: the weight must be in (0, 1]")
    count = len(release) + secagg.EXTRA
    masks = [secagg.self_mask(attempt.seed, attempt.nonce, node, count)]
    for peer in attempt.peers:
        if peer != node:
            agreed = secagg.agreed_key(attempt.sk1, attempt.keys[peer][0])
            masks.append(secagg.signed(node, peer, secagg.pair_mask(agreed, attempt.nonce, node, peer, count)))
    rng = np.random.default_rng(secrets.randbits(128))  # stochastic rounding: never the run's seeded stream
    vector, clipped = secagg.masked_vector(release, weight, attempt.clip, masks, rng)
    attempt.stage = "unmask"
    return vector, clipped


def unmask(node: int, config: ConfigRecord) -> ConfigRecord:
    """Seed shares of the uploaders, key shares of the rest of the peers; the attempt then ends here."""
    attempt = _open(node, config, "unmask")
    del _ATTEMPTS[node]  # one answer per attempt: a second request finds nothing
    active, dead = _ints(config, "active"), _ints(config, "dead")
    if set(active) & set(dead) or set(active) | set(dead) != set(attempt.peers):
        raise SecAggError("secure aggregation: uploaders and dropped clients must split the peers")
    if node not in active or len(active) < attempt.threshold:
        raise SecAggError("secure aggregation: fewer uploaders than the threshold")
    nids = [n for n in active + dead if n in attempt.held]
    shares = [attempt.held[n][0] if n in active else attempt.held[n][1] for n in nids]
    return ConfigRecord({"nids": nids, "shares": shares})


def forget(node: int) -> None:
    """Drop the node's secrets (a train reply that could not be masked)."""
    _ATTEMPTS.pop(node, None)
