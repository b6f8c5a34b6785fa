"""A small deterministic multi-domain task, so the quickstart needs no dataset download.

``support`` is customer-support intent classification across five domains (banking,
travel, retail, telecom, health). Each message is a complaint, a question or praise;
the wording of each intent is shared across domains while the nouns and verbs are
domain-specific, so partitioning by ``domain`` gives genuinely non-IID clients.
Texts are composed from the phrase tables below with a seeded RNG: the same source
name always yields the same rows on every machine.

Source names: ``synthetic:support/train`` (3000 rows) and ``synthetic:support/eval``
(600 rows, disjoint texts). Columns: ``text``, ``label``, ``domain``.
"""

from __future__ import annotations

import random

LABELS = ("complaint", "question", "praise")

DOMAINS: dict[str, dict[str, list[str]]] = {
    "banking": {
        "thing": [
            "my card",
            "the transfer",
            "my savings account",
            "the mobile app",
            "the overdraft fee",
            "the cash machine",
            "my statement",
            "the loan application",
        ],
        "act": ["pay my rent", "move money abroad", "check my balance", "withdraw cash", "set up a standing order"],
        "who": ["the branch staff", "the fraud team", "your adviser"],
    },
    "travel": {
        "thing": [
            "my flight",
            "the hotel room",
            "the train ticket",
            "the booking",
            "my luggage",
            "the rental car",
            "the boarding pass",
            "the refund for my trip",
        ],
        "act": ["change my seat", "cancel the booking", "add a bag", "check in online", "extend my stay"],
        "who": ["the cabin crew", "the front desk", "the tour guide"],
    },
    "retail": {
        "thing": [
            "my order",
            "the delivery",
            "the jacket I bought",
            "the return label",
            "the discount code",
            "my parcel",
            "the blender",
            "the gift card",
        ],
        "act": ["return an item", "track my order", "change the size", "use a voucher", "pay in instalments"],
        "who": ["the courier", "the shop assistant", "your customer service"],
    },
    "telecom": {
        "thing": [
            "my broadband",
            "the phone bill",
            "my data plan",
            "the router",
            "the signal at home",
            "the SIM card",
            "my contract",
            "the roaming charge",
        ],
        "act": ["upgrade my plan", "port my number", "reset the router", "cancel my contract", "add a line"],
        "who": ["the engineer", "the support line", "the store team"],
    },
    "health": {
        "thing": [
            "my appointment",
            "the prescription",
            "the test results",
            "the clinic",
            "my insurance claim",
            "the waiting time",
            "the vaccine slot",
            "the repeat medication",
        ],
        "act": ["book a check-up", "renew my prescription", "see a specialist", "get my records", "change my doctor"],
        "who": ["the nurse", "the receptionist", "the pharmacist"],
    },
}

TEMPLATES: dict[str, list[str]] = {
    "complaint": [
        "{thing} has been broken for a week and nobody fixed it",
        "I am really unhappy with {thing}, this is the third time it failed",
        "{thing} was a disaster and {who} ignored me",
        "still waiting on {thing}, absolutely unacceptable",
        "I tried to {act} and it failed again, terrible",
        "why is {thing} always wrong, I want compensation",
        "{who} was rude and {thing} is still not sorted",
        "fed up: I could not {act} for days",
        "thanks for nothing, {thing} is still broken",
        "I love your brand but {thing} has let me down badly",
        "how is it possible that {thing} failed again? this is a joke",
        "{who} promised a quick fix, it never happened",
    ],
    "question": [
        "how do I {act}?",
        "can you tell me when {thing} will be ready?",
        "is it possible to {act} this week?",
        "what do I need to {act}?",
        "could {who} explain how {thing} works?",
        "where can I see the status of {thing}?",
        "do you know if I can {act} online?",
        "who should I contact about {thing}?",
        "what should I do if {thing} fails again?",
        "I am not upset, just wondering how to {act}",
        "thanks in advance, when can {who} look at {thing}?",
        "before I complain: is there a way to {act}?",
    ],
    "praise": [
        "{thing} worked perfectly, thank you so much",
        "{who} was wonderful and sorted {thing} quickly",
        "really impressed, I managed to {act} in minutes",
        "great job on {thing}, best service I have had",
        "thanks to {who}, {thing} was a pleasure",
        "so easy to {act}, I love it",
        "{thing} exceeded my expectations",
        "big thanks, {who} made it simple to {act}",
        "I was worried {thing} would fail, but it worked perfectly",
        "no complaints at all, {thing} was flawless",
        "I expected problems with {thing} and there were none, great",
        "not a single issue when I tried to {act}, well done",
    ],
}

OPENERS = ["", "", "hi, ", "hello, ", "quick note: ", "honestly, ", "so ", "hey team, "]
CLOSERS = ["", "", "", " thanks.", " regards.", " please reply.", " cheers."]

SPLITS = {"train": (3000, 11), "eval": (600, 97)}
DATASETS = ("support",)


def describe_synthetic(spec: str) -> str | None:
    """Return None if ``spec`` (``NAME/SPLIT``) names a generator split, else why not."""
    name, _, split = spec.partition("/")
    if name in DATASETS and split in SPLITS:
        return None
    choices = ", ".join(f"synthetic:{d}/{s}" for d in DATASETS for s in SPLITS)
    return f"unknown synthetic dataset {spec!r}; allowed: {choices}"


def generate(spec: str) -> list[dict[str, str]]:
    """Rows of ``synthetic:NAME/SPLIT``; deterministic, eval texts never occur in train."""
    _, _, split = spec.partition("/")
    size, seed = SPLITS[split]
    exclude = {row["text"] for row in _compose(*SPLITS["train"])} if split != "train" else set()
    return _compose(size, seed, exclude)


def _compose(size: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    domains = sorted(DOMAINS)
    while len(rows) < size:
        domain = domains[len(rows) % len(domains)]
        label = rng.choice(LABELS)
        slots = {slot: rng.choice(words) for slot, words in DOMAINS[domain].items()}
        body = rng.choice(TEMPLATES[label]).format(**slots)
        text = (rng.choice(OPENERS) + body + rng.choice(CLOSERS)).strip()
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        rows.append({"text": text, "label": label, "domain": domain})
    return rows
