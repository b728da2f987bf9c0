"""A haystack around the generated fact world: more invented entities, each with its own facts, Q/A passages,
distractors, confusers and contradictions, a share of them named as near misses of the world's entities
(Velor -> Velmaith), all written with the world's templates and value pools. No haystack passage names an entity
of the world, so none states a query's fact: the world's queries keep exactly their relevant passages, needles in
a corpus of any size (benchmarks/scale.py)."""

from __future__ import annotations

import random
from typing import Iterator

from trackstar.data.records import Passage
from trackstar.data.world import (_CODAS, _DISTRACTORS, _Q, _RELATIVES, _VOWELS, RELATIONS, FactWorldConfig, Relation,
                                  _unique_names, world_names)

BLOCK = 1000  # entities written, then shuffled together, at a time: the stream's working set
ID_DIGITS = 8  # ids h00000000 ..: the same id for the same passage whatever n


def _entity_name(rng: random.Random, stems: list[str], near_miss: float, taken: set[str]) -> str:
    """A new name: with probability `near_miss` a world entity's stem with another ending, else a fresh one;
    never a name of the world or one drawn before."""
    if rng.random() < near_miss:
        stem = rng.choice(stems)
        for _ in range(100):
            cand = stem + rng.choice(_VOWELS) + rng.choice(_CODAS)
            if cand not in taken:
                taken.add(cand)
                return cand
    return _unique_names(rng, 1, taken, 2, 3)[0]


def _entity_passages(e: str, rels: tuple[Relation, ...], values: dict[str, list[str]], cfg: FactWorldConfig,
                     rng: random.Random) -> list[str]:
    """One haystack entity's passages, in the world's proportions: statements of a value per relation, Q/A
    passages, distractors, confusers and contradicting statements."""
    out: list[str] = []
    asks = rng.random() < cfg.question_fraction
    for r in rels:
        v = rng.choice(values[r.name])
        chosen = rng.sample(r.statements, cfg.paraphrases)
        out.extend(t.format(e=e, v=v) for t in chosen)
        if asks:
            out.append(_Q.format(q=r.train_question.format(e=e)) + f" {v}.")
        if rng.random() < cfg.contradicted:
            out.append(rng.choice(chosen).format(e=e, v=rng.choice([x for x in values[r.name] if x != v])))
    out.extend(t.format(e=e) for t in rng.sample(_DISTRACTORS, cfg.distractors_per_entity))
    for _ in range(cfg.confusers_per_entity):
        r = rng.choice(rels)
        out.append(r.confuser.format(e=e, v=rng.choice(values[r.name]), who=rng.choice(_RELATIVES)))
    return out


def haystack_passages(world: FactWorldConfig, n: int, seed: int = 0) -> Iterator[Passage]:
    """The first `n` passages of the world's haystack, ids h00000000, h00000001, ...; deterministic in (world,
    seed), and a smaller n gives a prefix of the same stream. Entities are written BLOCK at a time and their
    passages shuffled within the block, so memory stays flat in n."""
    if not 0 <= n <= 10 ** ID_DIGITS:
        raise ValueError(f"n must be in 0..{10 ** ID_DIGITS}, got {n}")
    names = world_names(world)
    taken = set(names.taken)
    stems = [e[: max(3, len(e) - 2)] for e in names.entities]
    rels = RELATIONS[: world.relations]
    rng = random.Random(f"{world.seed}-haystack-{seed}")
    i = 0
    while i < n:
        block: list[str] = []
        for _ in range(BLOCK):
            e = _entity_name(rng, stems, world.near_miss_fraction, taken)
            block.extend(_entity_passages(e, rels, names.values, world, rng))
        rng.shuffle(block)
        for text in block[: n - i]:
            yield Passage(f"h{i:0{ID_DIGITS}d}", text)
            i += 1
