"""ProsQA (Hao et al. 2024, the Coconut paper): graph-reachability questions, their pairs, new problems.

A problem is a directed acyclic graph over named nodes. Nodes without parents are people ("Tom"),
the others made-up concepts ("terpus"); an edge a -> b reads "Tom is a terpus." when a is a person
and "Every terpus is a brimpus." when a is a concept. The question states every edge once, in a
shuffled order, then asks "Is Tom a lempus or scrompus?" about the root person and two concepts,
the target and the neg_target. The official JSON format (a list of records, keys in this order):
`question`, `answer` ("Tom is a lempus."), `steps` (a reasoning chain, one sentence per edge from
the root to the answer), `idx_to_symbol` (node names), `edges` ([from, to] indices), `root`,
`target`, `neg_target` (node indices).

Invariants of a valid problem (`check_prosqa`; every loaded, generated, saved and corrupted
problem is checked, and a violation raises a one-line ValueError naming it and the fix):
* node names are distinct words; root is a person, target and neg_target distinct concepts, and
  every edge leads to a concept; the edges are distinct and form a DAG;
* the question's facts are exactly the edges' sentences, and it asks about the root and both options;
* exactly one of target / neg_target is reachable from the root along the edges, and the answer is
  recomputed from the graph: it must read f"{root} is a {reachable option}.";
* the steps are a chain of edge sentences from the root to that option.

In the released validation and test splits (300 + 500 records, all valid) the reachable option is
always the target, and the released steps are always a shortest chain. 328 of the 800 problems
have several shortest chains, and no fixed tie rule tried (breadth-first in file or index order,
backwards by lowest or highest index) gives the released ones, so `solve` gives one shortest chain
(breadth-first, edges in file order): the released one in 625 problems, of its length in all.

`prosqa_pairs` corrupts a problem by changing ONE word of its facts: the concept an edge leads to
(`Tom is a terpus.` -> `Tom is a wumpus.`), chosen so that in the edited graph the root reaches the
neg_target and not the target, with no duplicate edge and no cycle. Both answers are recomputed
from the graphs. Candidates are ordered: edits of the root's own sentences first, then of other
edges; within each, edits that keep the length of the reasoning chain first; ties in an order
seeded by (seed, problem index). Token alignment is left to `interp.data.align.align(...,
answer_prefix="###")`; take several candidates per problem (`per_problem`) to keep more problems.

`generate_prosqa` draws new problems after the paper's recipe (its appendix on ProsQA, Algorithm 1):
seed nodes 0 and 1, then nodes added one by one, each drawing its parents with weight
1 + 1.5 * depth (depth: the longest path from a parentless node) among the nodes that do not
descend from seed 1 (probability 0.35), from seed 0 (0.35), or all (0.3); a node's label records
which seeds it descends from. What the released files show and the generator follows: a new node
is parentless (a person) with probability 0.05, else it has Poisson(1.5) >= 1 parents; 20 to 26
nodes are drawn and parentless ones that never get a child are dropped; the root is the seed whose
exclusive leaves (descending from it alone) lie deeper, the target its deepest exclusive leaf (3 to
6 steps away), the neg_target a random exclusive leaf of the other seed. Names come from the
released vocabulary (`PERSONS`, `CONCEPTS`), edges are listed by destination as released.
Measured on the 800 released problems / on 1500 generated ones (seed 0): nodes 22.8 / 22.6 on
average, edges 36.0 / 36.1, chain 3.77 / 3.76 steps (3: 41% / 43%, 4: 44% / 42%, 5: 13% / 13%,
6: 2.4% / 2.5%), shortest chains per problem 1.59 / 1.59, people 2.56 / 2.50.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from interp.data.pairs import NumberChange, Pair
from interp.family import COCONUT

FIELDS = ("question", "answer", "steps", "idx_to_symbol", "edges", "root", "target", "neg_target")
ANSWER_PREFIX = COCONUT.answer_prefix  # Coconut's answer text is "### " + answer
PERSONS = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren")
CONCEPTS = (
    "bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus hilpus impus jelpus jompus kerpus lempus lorpus numpus "
    "quimpus rempus rompus rorpus scrompus shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus yimpus yumpus zhorpus zumpus"
).split()

# The generator's recipe (module docstring).
NODES = (20, 26)
PERSON_RATE = 0.05
PARENTS_MEAN = 1.5
NOT_FROM_SEED_1 = 0.35  # P(parents drawn only from nodes that do not descend from seed 1)
NOT_FROM_SEED_0 = 0.35  # P(... from seed 0)
DEPTH_WEIGHT = 1.5
CHAIN_LENGTHS = (3, 6)  # inclusive range of the target's distance from the root

_ASK = re.compile(r"Is (\w+) a (\w+) or (\w+)\?")
_COUNTS = ("read", "drop.no_edit", "with_edit", "candidates", "pairs")


@dataclass(frozen=True)
class ProsQAProblem:
    """One ProsQA record (module docstring); `edges` are (from, to) node indices."""

    question: str
    steps: tuple[str, ...]
    answer: str
    idx_to_symbol: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    root: int
    target: int
    neg_target: int

    def to_dict(self) -> dict[str, Any]:
        """The official JSON record (keys in the released files' order)."""
        return {
            "question": self.question,
            "answer": self.answer,
            "steps": list(self.steps),
            "idx_to_symbol": list(self.idx_to_symbol),
            "edges": [list(e) for e in self.edges],
            "root": self.root,
            "target": self.target,
            "neg_target": self.neg_target,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ProsQAProblem:
        """Parse a record (ValueError naming a missing or mistyped field); does not check the graph."""
        if not isinstance(d, dict):
            raise ValueError(f"is a {type(d).__name__}, not an object with fields {', '.join(FIELDS)}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise ValueError(f"is missing field(s) {', '.join(missing)}; a ProsQA record has {', '.join(FIELDS)}")
        ok = {
            "question": isinstance(d["question"], str),
            "answer": isinstance(d["answer"], str),
            "steps": _list_of(d["steps"], lambda s: isinstance(s, str)),
            "idx_to_symbol": _list_of(d["idx_to_symbol"], lambda s: isinstance(s, str)),
            "edges": _list_of(d["edges"], lambda e: _list_of(e, _is_index) and len(e) == 2),
            **{k: _is_index(d[k]) for k in ("root", "target", "neg_target")},
        }
        bad = [k for k, good in ok.items() if not good]
        if bad:
            raise ValueError(
                f"has mistyped field(s) {', '.join(bad)}: question and answer are text, steps and idx_to_symbol lists of text, edges a list of [from, to] index pairs, root/target/neg_target indices"
            )
        return cls(d["question"], tuple(d["steps"]), d["answer"], tuple(d["idx_to_symbol"]), tuple((a, b) for a, b in d["edges"]), d["root"], d["target"], d["neg_target"])


def _list_of(value: Any, good: Callable[[Any], bool]) -> bool:
    return isinstance(value, list) and all(good(v) for v in value)


def _is_index(value: Any) -> bool:
    return type(value) is int


def is_person(name: str) -> bool:
    """People are capitalized ("Tom"), concepts are not ("terpus")."""
    return name[:1].isupper()


def sentence(problem: ProsQAProblem, edge: tuple[int, int]) -> str:
    """The fact an edge states: "Tom is a terpus." or "Every terpus is a brimpus."."""
    a, b = (problem.idx_to_symbol[i] for i in edge)
    return f"{a} is a {b}." if is_person(a) else f"Every {a} is a {b}."


def _facts(question: str) -> tuple[list[tuple[int, str]], str]:
    """The question's sentences before the last, each with its start offset, and the last one."""
    sentences = [(m.start(1), m.group(1)) for m in re.finditer(r"\s*([^.?]*[.?])", question)]
    if not sentences:
        return [], question
    return sentences[:-1], question[sentences[-1][0] :]


def _children(problem: ProsQAProblem) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in problem.idx_to_symbol]
    for a, b in problem.edges:
        out[a].append(b)
    return out


def _bfs(children: list[list[int]], start: int) -> dict[int, int | None]:
    """Breadth-first search from `start`: node -> the parent it was first reached from."""
    parent: dict[int, int | None] = {start: None}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in children[u]:
            if v not in parent:
                parent[v] = u
                queue.append(v)
    return parent


def _is_dag(children: list[list[int]]) -> bool:
    indegree = Counter(v for vs in children for v in vs)
    ready = [u for u in range(len(children)) if indegree[u] == 0]
    seen = 0
    while ready:
        u = ready.pop()
        seen += 1
        for v in children[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    return seen == len(children)


def _reachable_option(problem: ProsQAProblem, parent: dict[int, int | None]) -> int:
    """The one of target / neg_target reachable from the root (ValueError if not exactly one)."""
    name = problem.idx_to_symbol
    reached = [o for o in (problem.target, problem.neg_target) if o in parent]
    if len(reached) != 1:
        state = "both" if reached else "neither"
        raise ValueError(
            f"{state} of target {name[problem.target]!r} and neg_target {name[problem.neg_target]!r} is reachable from root {name[problem.root]!r}; "
            "exactly one must be: fix the edges, or regenerate the problem with interp.data.generate_prosqa"
        )
    return reached[0]


def solve(problem: ProsQAProblem) -> tuple[str, tuple[str, ...]]:
    """The answer and a shortest reasoning chain, both recomputed from the graph.

    Breadth-first search from the root, children in the order of `problem.edges`; the chain is the
    path to whichever of target / neg_target is reachable (ValueError unless exactly one is), in
    the official sentences: ("Tom is a terpus.", "Every terpus is a brimpus.", ...).
    """
    parent = _bfs(_children(problem), problem.root)
    node = _reachable_option(problem, parent)
    answer = f"{problem.idx_to_symbol[problem.root]} is a {problem.idx_to_symbol[node]}."
    chain: list[str] = []
    while (up := parent[node]) is not None:
        chain.append(sentence(problem, (up, node)))
        node = up
    return answer, tuple(reversed(chain))


def check_prosqa(problem: ProsQAProblem) -> None:
    """Raise a one-line ValueError (what is wrong, and the fix) unless `problem` keeps every
    invariant of the module docstring; the answer is recomputed from the graph."""
    name, n = problem.idx_to_symbol, len(problem.idx_to_symbol)
    regenerate = "regenerate the problem with interp.data.generate_prosqa"
    if len(set(name)) != n or not all(s.isalpha() for s in name):
        raise ValueError(f"idx_to_symbol must hold distinct one-word names, got {list(name)}; rename the nodes")
    nodes = (problem.root, problem.target, problem.neg_target)
    if not all(0 <= i < n for i in nodes) or not all(0 <= i < n for e in problem.edges for i in e):
        raise ValueError(f"a node index is out of range for {n} nodes (root/target/neg_target {list(nodes)}); fix the indices or {regenerate}")
    if not is_person(name[problem.root]) or is_person(name[problem.target]) or is_person(name[problem.neg_target]) or problem.target == problem.neg_target:
        raise ValueError(f"root {name[problem.root]!r} must be a person and target {name[problem.target]!r}, neg_target {name[problem.neg_target]!r} two distinct concepts; fix the indices")
    bad = next((e for e in problem.edges if is_person(name[e[1]])), None)
    if bad is not None or len(set(problem.edges)) != len(problem.edges):
        what = f"edge {list(bad)} leads to the person {name[bad[1]]!r}" if bad is not None else "an edge is listed twice"
        raise ValueError(f"{what}; edges lead to concepts, once each: fix the edges or {regenerate}")
    children = _children(problem)
    if not _is_dag(children):
        raise ValueError(f"the edges have a cycle; ProsQA graphs are acyclic: fix the edges or {regenerate}")
    facts, ask = _facts(problem.question)
    expected = Counter(sentence(problem, e) for e in problem.edges)
    stated = Counter(text for _, text in facts)
    if stated != expected:
        extra, lacking = list((stated - expected).elements()), list((expected - stated).elements())
        raise ValueError(f"the question's facts are not its edges' sentences (stated without an edge: {extra[:2]}, edges not stated: {lacking[:2]}); fix the question or the edges")
    m = _ASK.fullmatch(ask)
    if not m or m.group(1) != name[problem.root] or {m.group(2), m.group(3)} != {name[problem.target], name[problem.neg_target]}:
        want = f"Is {name[problem.root]} a {name[problem.target]} or {name[problem.neg_target]}? (options in either order)"
        raise ValueError(f"the question asks {ask!r}, expected {want!r}; fix the question's last sentence")
    parent = _bfs(children, problem.root)
    reachable = _reachable_option(problem, parent)
    answer = f"{name[problem.root]} is a {name[reachable]}."
    if problem.answer != answer:
        raise ValueError(f"the answer {problem.answer!r} does not follow from the graph: {name[problem.root]} reaches {name[reachable]!r}, so the answer is {answer!r}; fix the answer or the edges")
    edge_of = {sentence(problem, e): e for e in problem.edges}
    node = problem.root
    for k, step in enumerate(problem.steps):
        edge = edge_of.get(step)
        if edge is None or edge[0] != node:
            raise ValueError(f"step #{k} {step!r} is not an edge out of {name[node]!r}; the steps must chain from the root to the answer: replace them with interp.data.prosqa.solve(problem)[1]")
        node = edge[1]
    if node != reachable:
        raise ValueError(f"the steps end at {name[node]!r}, not at the answer {name[reachable]!r}; replace them with interp.data.prosqa.solve(problem)[1]")


def load_prosqa(path: str | Path) -> list[ProsQAProblem]:
    """Read an official ProsQA JSON file (a list of records) and check every record.

    Raises ValueError naming the file, the record index, what is wrong and the fix when the file
    is not a JSON list, a record misses a field, or a record breaks an invariant (module docstring;
    e.g. an answer that does not follow from its graph).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a ProsQA file: a JSON list of records") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected a list of ProsQA records")
    problems = []
    for i, record in enumerate(data):
        try:
            problem = ProsQAProblem.from_dict(record)
            check_prosqa(problem)
        except ValueError as e:
            raise ValueError(f"{path} record #{i}: {e}") from None
        problems.append(problem)
    return problems


def save_prosqa(path: str | Path, problems: Iterable[ProsQAProblem]) -> None:
    """Write `problems` in the official format (`json.dumps` of the records, as the released files
    are), after checking each (ValueError naming the first bad one); atomic: a temporary file
    next to `path` is moved into place."""
    path = Path(path)
    records = []
    for i, problem in enumerate(problems):
        try:
            check_prosqa(problem)
        except ValueError as e:
            raise ValueError(f"cannot write {path}: problem #{i}: {e}") from None
        records.append(problem.to_dict())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(records))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class _Edit:
    """Edge `index` (a, b) of the clean problem becomes (a, `new`) in `corrupted`; `span` is the
    character span of b's name in that edge's sentence of the clean question."""

    index: int
    new: int
    span: tuple[int, int]
    corrupted: ProsQAProblem


def _edits(problem: ProsQAProblem) -> list[_Edit]:
    """Every one-word edit of an edge's destination after which the root reaches the neg_target
    and not the target (module docstring), with its corrupted problem (answer and steps solved)."""
    name, children = problem.idx_to_symbol, _children(problem)
    below = [set(_bfs(children, u)) for u in range(len(name))]  # descendants, the node included
    reached = below[problem.root]
    starts = {text: start for start, text in _facts(problem.question)[0]}
    edits = []
    for k, (a, b) in enumerate(problem.edges):
        if a not in reached:
            continue
        without = [list(vs) for vs in children]
        without[a].remove(b)
        if problem.target in _bfs(without, problem.root):
            continue  # another path still reaches the target
        fact = sentence(problem, (a, b))
        end = starts[fact] + len(fact) - 1  # before the full stop
        span = (end - len(name[b]), end)
        for x, word in enumerate(name):
            if is_person(word) or x == b or (a, x) in problem.edges or a in below[x] or problem.neg_target not in below[x] or problem.target in below[x]:
                continue
            graph = replace(problem, question=problem.question[: span[0]] + word + problem.question[span[1] :], edges=problem.edges[:k] + ((a, x),) + problem.edges[k + 1 :])
            answer, steps = solve(graph)
            corrupted = replace(graph, answer=answer, steps=steps)
            check_prosqa(corrupted)
            edits.append(_Edit(k, x, span, corrupted))
    return edits


def _pair(index: int, rank: int, problem: ProsQAProblem, clean_steps: tuple[str, ...], edit: _Edit) -> Pair:
    name = problem.idx_to_symbol
    a, b = problem.edges[edit.index]
    return Pair(
        id=f"prosqa-{index}-{rank}",
        clean_question=problem.question,
        corrupted_question=edit.corrupted.question,
        clean_answer=problem.answer,
        corrupted_answer=edit.corrupted.answer,
        change=NumberChange(old=name[b], new=name[edit.new], span=edit.span),
        source={
            "dataset": "prosqa",
            "index": index,
            "root": name[problem.root],
            "target": name[problem.target],
            "neg_target": name[problem.neg_target],
            "edited_edge": {"index": edit.index, "from": name[a], "old": name[b], "new": name[edit.new]},
            "clean_steps": list(clean_steps),
            "corrupted_steps": list(edit.corrupted.steps),
        },
    )


def prosqa_pairs(problems: Sequence[ProsQAProblem], *, seed: int = 0, counts: Counter | None = None, per_problem: int | None = 1) -> list[Pair]:
    """Clean/corrupted pairs differing in one word of the facts, the corrupted answer the other option.

    For each problem (checked first), the candidate edits of the module docstring in their order
    (seeded by `seed` and the problem's index); the first `per_problem` become pairs (None: all),
    ids `prosqa-<problem index>-<rank>`. `source` holds the graph facts: problem index, root /
    target / neg_target names, the edited edge, and both sides' shortest chains. `counts` receives
    `read`, `drop.no_edit` (no one-word edit flips the answer), `with_edit`, `candidates`, `pairs`.
    """
    if per_problem is not None and per_problem < 1:
        raise ValueError(f"per_problem must be None (all candidates) or a positive count, got {per_problem}")
    counts = Counter() if counts is None else counts
    counts.update(dict.fromkeys(_COUNTS, 0))
    pairs = []
    for index, problem in enumerate(problems):
        counts["read"] += 1
        try:
            check_prosqa(problem)
        except ValueError as e:
            raise ValueError(f"problem #{index}: {e}") from None
        edits = _edits(problem)
        if not edits:
            counts["drop.no_edit"] += 1
            continue
        counts["with_edit"] += 1
        counts["candidates"] += len(edits)
        random.Random(f"prosqa:{seed}:{index}").shuffle(edits)
        clean_steps = solve(problem)[1]
        edits.sort(key=lambda e: (problem.edges[e.index][0] != problem.root, len(e.corrupted.steps) != len(clean_steps)))
        chosen = edits[:per_problem]
        pairs += [_pair(index, rank, problem, clean_steps, edit) for rank, edit in enumerate(chosen)]
        counts["pairs"] += len(chosen)
    return pairs


# ---------------------------------------------------------------- generation


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's sampler: the number of uniform draws whose running product stays above exp(-mean)."""
    k, product, limit = 0, rng.random(), math.exp(-mean)
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def _weighted_sample(rng: random.Random, items: list[int], weights: list[float], k: int) -> list[int]:
    """`k` distinct items, each draw proportional to the remaining weights."""
    items, weights, out = list(items), list(weights), []
    for _ in range(k):
        i = rng.choices(range(len(items)), weights=weights)[0]
        out.append(items.pop(i))
        weights.pop(i)
    return out


def _n_parents(rng: random.Random) -> int:
    if rng.random() < PERSON_RATE:
        return 0
    while (k := _poisson(rng, PARENTS_MEAN)) == 0:
        pass
    return k


def _sample_dag(rng: random.Random) -> tuple[list[tuple[int, int]], list[int]]:
    """Edges (sorted by the new node) and each node's label: bit 1 = descends from seed 0,
    bit 2 = from seed 1 (the paper's Algorithm 1)."""
    labels, depth, edges = [1, 2], [0, 0], []
    for new in range(2, rng.randint(*NODES)):
        r = rng.random()
        allowed = (0, 1) if r < NOT_FROM_SEED_1 else (0, 2) if r < NOT_FROM_SEED_1 + NOT_FROM_SEED_0 else (0, 1, 2, 3)
        candidates = [u for u in range(new) if labels[u] in allowed]
        parents = _weighted_sample(rng, candidates, [1 + DEPTH_WEIGHT * depth[u] for u in candidates], min(_n_parents(rng), len(candidates)))
        edges += [(u, new) for u in parents]
        labels.append(0)
        for u in parents:
            labels[-1] |= labels[u]
        depth.append(1 + max((depth[u] for u in parents), default=-1))
    return edges, labels


def _sample_problem(rng: random.Random) -> ProsQAProblem | None:
    """One problem from the recipe, or None when this graph has no valid root/target/neg_target."""
    edges, labels = _sample_dag(rng)
    used = sorted({u for e in edges for u in e})
    if used[:2] != [0, 1]:
        return None  # a seed without children
    renumber = {u: i for i, u in enumerate(used)}
    edges = [(renumber[a], renumber[b]) for a, b in edges]
    labels = [labels[u] for u in used]
    children: list[list[int]] = [[] for _ in used]
    for a, b in edges:
        children[a].append(b)
    leaves, deepest, dist = [], [], []
    for seed in (0, 1):  # each seed's exclusive leaves, their distances, the deepest of them
        d: dict[int, int] = {}
        for node, up in _bfs(children, seed).items():  # BFS order: parents first
            d[node] = 0 if up is None else d[up] + 1
        own = [u for u in range(len(used)) if labels[u] == labels[seed] and not children[u]]
        leaves.append(own)
        dist.append(d)
        deepest.append(max((d[u] for u in own), default=-1))
    root = rng.randrange(2) if deepest[0] == deepest[1] else deepest.index(max(deepest))
    if not leaves[1 - root] or not CHAIN_LENGTHS[0] <= deepest[root] <= CHAIN_LENGTHS[1]:
        return None
    target = rng.choice([u for u in leaves[root] if dist[root][u] == deepest[root]])
    neg_target = rng.choice(leaves[1 - root])
    has_parent = {b for _, b in edges}
    people = [u for u in range(len(used)) if u not in has_parent]
    names: list[str] = [""] * len(used)
    for u, s in zip(people, rng.sample(PERSONS, len(people))):
        names[u] = s
    concepts = [u for u in range(len(used)) if u in has_parent]
    for u, s in zip(concepts, rng.sample(CONCEPTS, len(concepts))):
        names[u] = s
    graph = ProsQAProblem("", (), "", tuple(names), tuple(edges), root, target, neg_target)
    facts = [sentence(graph, e) for e in edges]
    rng.shuffle(facts)
    options = [names[target], names[neg_target]]
    rng.shuffle(options)
    graph = replace(graph, question=" ".join([*facts, f"Is {names[root]} a {options[0]} or {options[1]}?"]))
    answer, steps = solve(graph)
    return replace(graph, answer=answer, steps=steps)


def generate_prosqa(n: int, *, seed: int) -> list[ProsQAProblem]:
    """`n` new problems after the released recipe (module docstring), each checked like a loaded one.

    Deterministic: problem i depends only on (seed, i), so a longer list extends a shorter one.
    Graphs without a valid target or neg_target are redrawn.
    """
    if n < 0:
        raise ValueError(f"n must be a non-negative number of problems, got {n}")
    problems = []
    for i in range(n):
        rng = random.Random(f"prosqa-generate:{seed}:{i}")
        while (problem := _sample_problem(rng)) is None:
            pass
        check_prosqa(problem)
        problems.append(problem)
    return problems
