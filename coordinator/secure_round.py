"""One attempt of a round under secure aggregation: four exchanges, and the coordinator learns one sum.

    setup       each sampled client: two public keys, a commitment to its self-mask seed, its example count
    share-keys  everyone's keys to everyone; back come the sealed share envelopes and a digest of each share
    train       the strategy's train message plus the envelopes addressed to the client, its weight and the
                release layout; back comes the masked release (client/client_app.py, client/secagg.py)
    unmask      who uploaded and who dropped; back come seed shares of the uploaders, key shares of the rest

Each exchange is ``replies.send`` + ``collect`` with its own deadline and byte budget, so every
bound of a plain round holds. A reply that breaks a rule drops its client from the attempt (one
line in the round's rejections, in fixed words); shares are checked against their dealer's
digests before use, and a rebuilt secret against its commitment (the seed) or its public key
(the first private key). The attempt fails, with one line, when fewer than the threshold remain
at any stage or when a secret cannot be rebuilt; a dealer whose shares rebuild nothing sits out
the round's next attempt. Nothing individual is kept past the attempt.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from fedtune.coordinator.replies import ReplyBudget, collect, send
from fedtune.coordinator.session import Session
from fedtune.core import secagg, wire
from fedtune.core.config import Config
from fedtune.core.secagg import SecAggError
from fedtune.strategies import LoraStrategy
from fedtune.strategies.base import Aggregate
from fedtune.strategies.secure import aggregate_mean, clip_range, release_layout, weights
from fedtune.strategies.updates import (
    COUNT,
    REPLY_RECORDS_BYTES,
    WEIGHT_KEY,
    ClientUpdate,
    client_error,
    decode_masked,
    fault,
    weighted_metrics,
)

SETUP, SHARE_KEYS, UNMASK = (f"{MessageType.TRAIN}.secagg_{stage}" for stage in ("setup", "share_keys", "unmask"))
DIGEST_BYTES = 32


class StageFailed(Exception):
    """The attempt cannot go on (the text is the round's one line)."""


@dataclass
class Member:
    """What the coordinator holds of one client in one attempt (public values only)."""

    node: int
    name: str
    count: int
    pk1: bytes
    pk2: bytes
    commit: bytes
    b_digests: list[bytes] = field(default_factory=list)  # share-keys: the digest of each holder's seed share
    sk_digests: list[bytes] = field(default_factory=list)
    envelopes: dict[int, bytes] = field(default_factory=dict)  # holder -> its sealed envelope


@dataclass
class SecureRound:
    grid: Grid
    session: Session
    strategy: LoraStrategy
    config: Config
    server_round: int
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    suspects: set[int] = field(default_factory=set)  # dealers whose shares rebuilt nothing: out of the next attempt
    server_seconds: float = 0.0  # the coordinator's own work: checking replies, rebuilding secrets, the sum
    stage_seconds: float = 0.0  # wall time of the three exchanges beside training

    def run(self, messages: list[Message], deadline: float) -> Aggregate:
        """The attempt's aggregate from the strategy's train MESSAGES (``Aggregate(None, ...)`` with the one line)."""
        self.session.start_round([])
        self.session.ledger.sent_to = len(messages)
        try:
            return self._run({m.metadata.dst_node_id: m for m in messages}, deadline)
        except StageFailed as failed:
            return Aggregate(None, None, {}, f"secure aggregation: {failed}")

    def _run(self, messages: dict[int, Message], deadline: float) -> Aggregate:
        fed = self.config.federation
        threshold = secagg.threshold_for(len(messages), fed.secagg_threshold)
        self._enough("setup", len(messages), len(messages), threshold)
        clip = clip_range(self.config)
        setup = {"secagg-nonce": self.nonce, "threshold": threshold, "clip": clip, "round": self.server_round}
        started = time.time()
        members = self._setup(sorted(messages), setup, threshold)
        order = sorted(members)
        self._share_keys(members, order, threshold)
        self.stage_seconds = time.time() - started
        layout = release_layout(self.strategy)
        length = sum(int(np.prod(shape)) for _, shape in layout) + secagg.EXTRA
        peers = sorted(members)
        scaled, capped = weights(self.strategy, [members[n].count for n in peers])
        weight = dict(zip(peers, scaled))
        uploads, accepted = self._train(
            messages, members, peers, weight, [n for n, _ in layout], length, deadline, threshold
        )
        active = sorted(uploads)
        started = time.time()
        total = self._unmask(members, order, active, sorted(set(peers) - set(uploads)), uploads, threshold)
        self.stage_seconds += time.time() - started
        computing = time.perf_counter()
        expected = sum(secagg.weight_factor(weight[n]) for n in active)
        try:
            summed = secagg.read_sum(total, len(active), clip, expected)
        except SecAggError as err:
            raise StageFailed(str(err)) from None
        counted = [(weight[u.node_id], u.metrics) for u in accepted]
        stats = {
            "secagg_clients": len(active), "secagg_dropped": len(peers) - len(active),
            "secagg_clipped": summed.clipped, "secagg_s": round(self.stage_seconds, 3),
        }  # fmt: skip
        stats |= {"robust_capped": capped} if capped else {}
        outcome = aggregate_mean(
            self.strategy, self.server_round, summed.mean, MetricRecord(weighted_metrics(counted)), stats
        )
        self.server_seconds += time.perf_counter() - computing
        return outcome

    # -- the four exchanges -------------------------------------------------------------------------
    def _setup(self, nodes: list[int], setup: dict, threshold: int) -> dict[int, Member]:
        members: dict[int, Member] = {}

        def receive(reply: Message, node: int, name: str) -> None:
            record = _record(reply)
            secagg.public_key(record.get("pk1"))
            secagg.public_key(record.get("pk2"))
            commit = record.get("commit")
            if not (isinstance(commit, bytes) and len(commit) == DIGEST_BYTES) or record["pk1"] == record["pk2"]:
                raise SecAggError("secagg setup: a commitment of 32 bytes and two different keys")
            metrics = reply.content["metrics"] if "metrics" in reply.content.metric_records else {}
            count = int(COUNT.check(WEIGHT_KEY, metrics.get(WEIGHT_KEY)))
            members[node] = Member(node, name, count, record["pk1"], record["pk2"], commit)

        self._exchange(SETUP, {node: ConfigRecord(setup) for node in nodes}, receive, 4096, self._stage_deadline())
        keys = [key for m in members.values() for key in (m.pk1, m.pk2)]
        for node, member in list(members.items()):  # fresh keys collide only between colluders: drop them all
            if keys.count(member.pk1) > 1 or keys.count(member.pk2) > 1:
                self._reject(member.name, "secagg setup: a key another client also sent")
                del members[node]
        self._enough("setup", len(members), len(nodes), threshold)
        return members

    def _share_keys(self, members: dict[int, Member], order: list[int], threshold: int) -> None:
        record = ConfigRecord({
            "secagg-nonce": self.nonce, "nodes": order,
            "pk1": [members[n].pk1 for n in order], "pk2": [members[n].pk2 for n in order],
        })  # fmt: skip
        answered: set[int] = set()

        def receive(reply: Message, node: int, name: str) -> None:
            got = _record(reply)
            dsts, envelopes = got.get("dsts"), got.get("envelopes")
            b_digests, sk_digests = got.get("b-digests"), got.get("sk-digests")
            if dsts != [n for n in order if n != node] or not _bytes_list(
                envelopes, len(order) - 1, secagg.ENVELOPE_BYTES
            ):
                raise SecAggError("secagg share-keys: one envelope of the right size for every other client, in order")
            if not (
                _bytes_list(b_digests, len(order), DIGEST_BYTES) and _bytes_list(sk_digests, len(order), DIGEST_BYTES)
            ):
                raise SecAggError("secagg share-keys: one digest of 32 bytes per share")
            member = members[node]
            member.b_digests, member.sk_digests = list(b_digests), list(sk_digests)
            member.envelopes = dict(zip(dsts, envelopes))
            answered.add(node)

        budget = 4096 + len(order) * (secagg.ENVELOPE_BYTES + 2 * DIGEST_BYTES + 64)
        self._exchange(SHARE_KEYS, dict.fromkeys(order, record), receive, budget, self._stage_deadline())
        for node in set(members) - answered:
            del members[node]
        self._enough("share-keys", len(members), len(order), threshold)

    def _train(
        self, messages: dict[int, Message], members: dict[int, Member], peers: list[int], weight: dict[int, float],
        names: list[str], length: int, deadline: float, threshold: int,
    ) -> tuple[dict[int, np.ndarray], list[ClientUpdate]]:  # fmt: skip
        sent = []
        for node in peers:
            message = messages[node]
            srcs = [n for n in peers if n != node]
            message.content["secagg"] = ConfigRecord({
                "secagg-nonce": self.nonce, "nonce": secrets.token_hex(16), "peers": peers, "srcs": srcs,
                "envelopes": [members[src].envelopes[node] for src in srcs], "weight": weight[node], "names": names,
            })  # fmt: skip
            sent.append(message)
        self.session.ledger.bytes_down += sum(wire.payload_bytes(m.content) for m in sent)
        uploads: dict[int, np.ndarray] = {}
        accepted: list[ClientUpdate] = []

        def receive(reply: Message, node: int, name: str) -> None:
            if self.session.budget_spent(reply, name):
                return
            update, vector, bad = decode_masked(reply.content, node, name, self.strategy, length)
            for src in set(bad) & set(peers):
                self._reject(members[src].name, "secagg: its envelope did not open for a peer")
            uploads[node] = vector
            accepted.append(update)

        budget = ReplyBudget(self.strategy.max_reply_bytes(MessageType.TRAIN) + 8 * secagg.EXTRA)
        self.session.ledger.silent = collect(self.grid, send(self.grid, sent, deadline), deadline, budget, self._checked(receive))
        self.session.ledger.updates = accepted
        self._enough("train", len(uploads), len(peers), max(threshold, self.strategy.min_clients))
        return uploads, accepted

    def _unmask(
        self, members: dict[int, Member], order: list[int], active: list[int], dead: list[int],
        uploads: dict[int, np.ndarray], threshold: int,
    ) -> np.ndarray:  # fmt: skip
        record = ConfigRecord({"secagg-nonce": self.nonce, "active": active, "dead": dead})
        seed_shares: dict[int, list[bytes]] = {n: [] for n in active}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dead}

        def receive(reply: Message, node: int, name: str) -> None:
            got = _record(reply)
            nids, shares = got.get("nids"), got.get("shares")
            if not (isinstance(nids, list) and isinstance(shares, list) and len(nids) == len(shares) <= len(order)):
                raise SecAggError("secagg unmask: one share per listed client")
            if len(set(map(str, nids))) != len(nids) or not set(nids) <= set(active) | set(dead):
                raise SecAggError("secagg unmask: shares only of the listed clients, each once")
            holder = order.index(node)
            for dealer, share in zip(nids, shares):
                pool, digests = (
                    (seed_shares, members[dealer].b_digests)
                    if dealer in active
                    else (key_shares, members[dealer].sk_digests)
                )
                size = secagg.B_SHARE_BYTES if dealer in active else secagg.SK_SHARE_BYTES
                if isinstance(share, bytes) and len(share) == size and secagg.share_index(share) == holder + 1:
                    if secagg.digest(share) == digests[holder]:
                        pool[dealer].append(share)
                        continue
                self._reject(name, "secagg unmask: a share that is not the one dealt")

        budget = 4096 + len(order) * (secagg.SK_SHARE_BYTES + 64)
        self._exchange(UNMASK, dict.fromkeys(active, record), receive, budget, self._stage_deadline())
        computing = time.perf_counter()
        count = len(next(iter(uploads.values())))
        total = np.zeros(count, dtype=np.uint32)
        for node in active:
            total += uploads[node]
            seed = secagg.rebuilt_seed(
                self._enough_shares(seed_shares[node], node, threshold), members[node].commit, self.nonce, node
            )
            if seed is None:
                self._suspect(members[node])
            total -= secagg.self_mask(seed, self.nonce, node, count)
        for gone in dead:
            key = secagg.rebuilt_private_key(self._enough_shares(key_shares[gone], gone, threshold), members[gone].pk1)
            if key is None:
                self._suspect(members[gone])
            for node in active:  # the pair masks NODE added with GONE: take them out again
                agreed = secagg.agreed_key(key, members[node].pk1)
                total -= secagg.signed(node, gone, secagg.pair_mask(agreed, self.nonce, node, gone, count))
        self.server_seconds += time.perf_counter() - computing
        return total

    # -- helpers ------------------------------------------------------------------------------------
    def _exchange(
        self,
        kind: str,
        records: dict[int, ConfigRecord],
        receive: Callable[[Message, int, str], None],
        max_bytes: int,
        deadline: float,
    ) -> None:
        """Send one stage to the nodes of RECORDS and hand each acceptable reply to RECEIVE (rejections recorded)."""
        messages = [
            Message(content=wire.sealed({"config": record}, secrets.token_hex(16)), message_type=kind, dst_node_id=node)
            for node, record in records.items()
        ]
        self.session.ledger.bytes_down += sum(wire.payload_bytes(m.content) for m in messages)

        budget = ReplyBudget(REPLY_RECORDS_BYTES + max_bytes)
        collect(self.grid, send(self.grid, messages, deadline), deadline, budget, self._checked(receive))

    def _checked(self, receive: Callable[[Message, int, str], None]) -> Callable[[Message], None]:
        """RECEIVE behind the checks every stage's reply passes first: not an error, bytes counted, its node's
        own name; anything RECEIVE raises rejects that reply only, in fixed words."""

        def checked(reply: Message) -> None:
            node = reply.metadata.src_node_id
            name = self.session.identity.name(node)
            if reply.has_error():
                self._reject(name, client_error(reply.error.code))
                return
            self.session.ledger.replies += 1
            try:
                self.session.ledger.bytes_up += wire.payload_bytes(reply.content)
                name = self.session.identify(node, reply)
                receive(reply, node, name)
            except Exception as err:  # one client's reply must never fail the round
                self._reject(getattr(err, "name", name), fault(err))

        return checked

    def _stage_deadline(self) -> float:
        return time.time() + min(self.config.federation.secagg_stage_timeout, self.config.federation.round_timeout)

    def _enough(self, stage: str, left: int, started: int, threshold: int) -> None:
        if left < threshold:
            raise StageFailed(f"stopped at {stage}: {left} of {started} clients answered, threshold {threshold}")

    def _enough_shares(self, shares: list[bytes], node: int, threshold: int) -> list[bytes]:
        if len(shares) < threshold:
            raise StageFailed(
                f"stopped at unmask: {len(shares)} valid shares of a client's secret, threshold {threshold}"
            )
        return shares[:threshold]

    def _suspect(self, member: Member) -> NoReturn:
        self.suspects.add(member.node)
        self._reject(member.name, "secagg: its shares rebuild no secret it committed to")
        raise StageFailed("stopped at unmask: a client's shares rebuild no secret it committed to")

    def _reject(self, name: str, reason: str) -> None:
        self.session.reject(name, reason)


def _record(reply: Message) -> ConfigRecord:
    if "secagg" not in reply.content.config_records:
        raise SecAggError("a secure-aggregation reply needs a 'secagg' record")
    return reply.content["secagg"]


def _bytes_list(values: object, count: int, size: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, bytes) and len(v) == size for v in values)
    )
