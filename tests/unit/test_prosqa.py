"""ProsQA: the released splits load and their answers follow from their graphs, `solve` gives the
hand-worked shortest chain, one-word pairs flip the answer (checked with a reachability written
here, from the question text alone), they align under GPT-2, and the generator is deterministic
and valid. The released files are read from ../shared/data/prosqa, never copied."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, deque
from pathlib import Path

import pytest

from interp.data import ProsQAProblem, align, check_prosqa, generate_prosqa, load_pairs, load_prosqa, prosqa_pairs, save_pairs, save_prosqa, solve_prosqa
from interp.data.prosqa import ANSWER_PREFIX, CONCEPTS, PERSONS

PROSQA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "prosqa"
SPLITS = {"valid": 300, "test": 500}
_FACT = re.compile(r"(?:Every )?(\w+) is a (\w+)\.")
_ASK = re.compile(r"Is (\w+) a (\w+) or (\w+)\?")


@pytest.fixture(scope="module")
def released() -> list[ProsQAProblem]:
    return [p for split in SPLITS for p in load_prosqa(PROSQA / f"{split}.json")]


def reaches(edges: list[tuple[str, str]], start: str) -> set[str]:
    """Names reachable from `start` along directed edges (depth-first), `start` included."""
    seen, todo = {start}, [start]
    while todo:
        u = todo.pop()
        for a, b in edges:
            if a == u and b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def read_question(question: str) -> tuple[list[tuple[str, str]], str, tuple[str, str]]:
    """The edges stated by a question's facts (by name), who it asks about, and the two options."""
    *facts, ask = re.split(r"(?<=\.) ", question)
    who, a, b = _ASK.fullmatch(ask).groups()
    return [_FACT.fullmatch(f).groups() for f in facts], who, (a, b)


def named_edges(p: ProsQAProblem) -> list[tuple[str, str]]:
    return [(p.idx_to_symbol[a], p.idx_to_symbol[b]) for a, b in p.edges]


def shortest_chain_count(p: ProsQAProblem, goal: int) -> tuple[int, int]:
    """(length, number) of the shortest paths root -> goal, counted breadth-first."""
    dist, count, queue = {p.root: 0}, Counter({p.root: 1}), deque([p.root])
    while queue:
        u = queue.popleft()
        for a, b in p.edges:
            if a != u:
                continue
            if b not in dist:
                dist[b] = dist[u] + 1
                queue.append(b)
            if dist[b] == dist[u] + 1:
                count[b] += count[u]
    return dist[goal], count[goal]


def test_every_released_record_loads_and_its_answer_follows_from_its_graph(released):
    assert [len(load_prosqa(PROSQA / f"{s}.json")) for s in SPLITS] == list(SPLITS.values())
    undirected_would_fail = 0
    for p in released:
        name = p.idx_to_symbol
        reached = reaches(named_edges(p), name[p.root])
        assert name[p.target] in reached and name[p.neg_target] not in reached  # released: the target is always the answer
        assert solve_prosqa(p)[0] == p.answer == f"{name[p.root]} is a {name[p.target]}."
        both_ways = named_edges(p) + [(b, a) for a, b in named_edges(p)]
        undirected_would_fail += name[p.neg_target] in reaches(both_ways, name[p.root])
    # the check discriminates: a search ignoring edge direction would also reach the neg_target here
    assert undirected_would_fail == 561


def test_solve_gives_a_shortest_chain_the_released_one_when_unique(released):
    unique = same = 0
    for p in released:
        answer, steps = solve_prosqa(p)
        same += steps == p.steps
        length, number = shortest_chain_count(p, p.target)
        assert len(steps) == len(p.steps) == length  # the released chains are all shortest
        check_prosqa(ProsQAProblem(p.question, steps, answer, p.idx_to_symbol, p.edges, p.root, p.target, p.neg_target))
        if number == 1:
            unique += 1
            assert steps == p.steps
    assert unique == 472  # the other 328 have several shortest chains; no fixed tie rule gives the released ones
    assert same == 625


def test_save_reproduces_the_released_files_byte_for_byte(released, tmp_path):
    for split in SPLITS:
        save_prosqa(tmp_path / f"{split}.json", load_prosqa(PROSQA / f"{split}.json"))
        assert (tmp_path / f"{split}.json").read_bytes() == (PROSQA / f"{split}.json").read_bytes()
    bad = ProsQAProblem(**{**vars(released[0]), "answer": "Tom is a scrompus."})
    with pytest.raises(ValueError, match=r"cannot write .*: problem #1: the answer 'Tom is a scrompus.' does not follow"):
        save_prosqa(tmp_path / "valid.json", [released[0], bad])
    assert (tmp_path / "valid.json").read_bytes() == (PROSQA / "valid.json").read_bytes()  # the old file stays
    assert sorted(f.name for f in tmp_path.iterdir()) == ["test.json", "valid.json"]  # and no temporary file


def first_records() -> list[dict]:
    """The first two released validation records (#0 asks "Is Tom a lempus or scrompus?")."""
    return json.loads((PROSQA / "valid.json").read_text())[:2]


def edited(index: int, **changes) -> list[dict]:
    records = first_records()
    records[index] = {**records[index], **changes}
    return records


def without(index: int, key: str) -> list[dict]:
    records = first_records()
    del records[index][key]
    return records


QUESTION_0 = first_records()[0]["question"]


def cut_target_edge() -> list[dict]:
    """Record #1 with the last edge of its answer chain removed from the graph and the question."""
    records = first_records()
    r = records[1]
    name = r["idx_to_symbol"]
    edge = next(e for e in r["edges"] if e[1] == r["target"])
    fact = f"Every {name[edge[0]]} is a {name[edge[1]]}." if name[edge[0]].islower() else f"{name[edge[0]]} is a {name[edge[1]]}."
    r["edges"] = [e for e in r["edges"] if e != edge]
    r["question"] = r["question"].replace(fact + " ", "")
    return records


@pytest.mark.parametrize(
    "records, message",
    [
        # record #0: "Tom is a lempus." (Tom -> terpus -> brimpus -> lempus); the options swapped
        (edited(0, answer="Tom is a scrompus."), r"record #0: the answer 'Tom is a scrompus.' does not follow from the graph: Tom reaches 'lempus', so the answer is 'Tom is a lempus.'; fix"),
        (cut_target_edge(), r"record #1: neither of target .* and neg_target .* is reachable from root .*; exactly one must be: fix the edges"),
        (edited(0, question=QUESTION_0.replace("Is Tom a", "Is Davis a")), r"record #0: the question asks 'Is Davis a lempus or scrompus\?', expected 'Is Tom a lempus or scrompus\?"),
        (edited(0, question=QUESTION_0.replace("Tom is a terpus. ", "")), r"record #0: the question's facts are not its edges' sentences .*edges not stated: \['Tom is a terpus.'\]"),
        (edited(1, steps=[]), r"record #1: the steps end at '\w+', not at the answer"),
        (edited(0, steps=["Tom is a terpus.", "Every brimpus is a lempus."]), r"record #0: step #1 'Every brimpus is a lempus.' is not an edge out of 'terpus'"),
        (without(1, "edges"), r"record #1: is missing field\(s\) edges; a ProsQA record has question, answer, steps"),
        (edited(1, root="1"), r"record #1: has mistyped field\(s\) root"),
        (edited(0, edges=[*first_records()[0]["edges"], [16, 1]]), r"record #0: edge \[16, 1\] leads to the person 'Tom'"),
    ],
)
def test_a_record_that_breaks_the_format_is_refused_in_one_line(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=message) as e:
        load_prosqa(path)
    assert str(e.value).startswith(f"{path} record #") and "\n" not in str(e.value)


def test_not_a_list_is_refused(tmp_path):
    (tmp_path / "p.json").write_text('{"question": "x"}')
    with pytest.raises(ValueError, match=r"holds a JSON dict, expected a list of ProsQA records"):
        load_prosqa(tmp_path / "p.json")


def hand_built() -> ProsQAProblem:
    """Tom -> wumpus -> rompus -> lempus (listed first) and Tom -> yumpus -> lempus (shorter);
    Sam -> jompus -> scrompus; breadth-first search must take the yumpus route."""
    names = ("Tom", "Sam", "wumpus", "yumpus", "rompus", "jompus", "lempus", "scrompus")
    edges = ((0, 2), (2, 4), (4, 6), (0, 3), (3, 6), (1, 5), (5, 7))
    facts = "Every rompus is a lempus. Tom is a wumpus. Sam is a jompus. Every yumpus is a lempus. Every jompus is a scrompus. Every wumpus is a rompus. Tom is a yumpus."
    return ProsQAProblem(f"{facts} Is Tom a scrompus or lempus?", (), "", names, edges, root=0, target=6, neg_target=7)


def test_solve_on_a_hand_built_graph_gives_the_hand_worked_chain():
    p = hand_built()
    chain = ("Tom is a yumpus.", "Every yumpus is a lempus.")
    assert solve_prosqa(p) == ("Tom is a lempus.", chain)
    check_prosqa(ProsQAProblem(**{**vars(p), "answer": "Tom is a lempus.", "steps": chain}))
    with pytest.raises(ValueError, match=r"both of target 'lempus' and neg_target 'scrompus' is reachable from root 'Tom'"):
        solve_prosqa(ProsQAProblem(**{**vars(p), "edges": (*p.edges, (4, 7))}))
    # two routes reach lempus, so no one-word edit cuts them both: no pair
    counts = Counter()
    assert prosqa_pairs([ProsQAProblem(**{**vars(p), "answer": "Tom is a lempus.", "steps": chain})], counts=counts) == []
    assert counts["drop.no_edit"] == 1


def test_the_hand_found_edits_in_their_documented_order():
    """Tom -> wumpus -> lempus, Sam -> jompus -> scrompus. By hand: re-pointing "Tom is a wumpus."
    to jompus (chain of 2, as the clean one) or scrompus (1), or "Every wumpus is a lempus." to
    scrompus (2) or jompus (3); re-pointing it to wumpus itself would be a cycle. Root edits come
    first, then edits keeping the chain length, whatever the seed."""
    names = ("Tom", "Sam", "wumpus", "jompus", "lempus", "scrompus")
    question = "Every jompus is a scrompus. Tom is a wumpus. Sam is a jompus. Every wumpus is a lempus. Is Tom a lempus or scrompus?"
    p = ProsQAProblem(question, ("Tom is a wumpus.", "Every wumpus is a lempus."), "Tom is a lempus.", names, ((0, 2), (2, 4), (1, 3), (3, 5)), 0, 4, 5)
    for seed in range(4):
        pairs = prosqa_pairs([p], seed=seed, per_problem=None)
        assert [(x.source["edited_edge"]["from"], x.change.new) for x in pairs] == [("Tom", "jompus"), ("Tom", "scrompus"), ("wumpus", "scrompus"), ("wumpus", "jompus")]
    first = pairs[0]
    assert first.corrupted_question == question.replace("Tom is a wumpus.", "Tom is a jompus.")
    assert (first.change.old, first.change.span) == ("wumpus", (37, 43)) and question[37:43] == "wumpus"
    assert (first.clean_answer, first.corrupted_answer) == ("Tom is a lempus.", "Tom is a scrompus.")
    assert first.source["corrupted_steps"] == ["Tom is a jompus.", "Every jompus is a scrompus."]
    assert [len(x.source["corrupted_steps"]) for x in pairs] == [2, 1, 2, 3]


def test_pairs_change_one_word_and_the_answer_to_the_other_option(released):
    counts = Counter()
    pairs = prosqa_pairs(released, counts=counts)
    assert dict(counts) == {"read": 800, "drop.no_edit": 158, "with_edit": 642, "candidates": 7118, "pairs": 642}
    assert len({p.id for p in pairs}) == len(pairs) == 642
    for pair in pairs:
        clean, corrupted = pair.clean_question.split(" "), pair.corrupted_question.split(" ")
        assert len(clean) == len(corrupted) and sum(a != b for a, b in zip(clean, corrupted)) == 1
        start, end = pair.change.span
        assert pair.clean_question[start:end] == pair.change.old != pair.change.new == pair.corrupted_question[start : start + len(pair.change.new)]
        assert pair.clean_question[:start] == pair.corrupted_question[:start] and pair.clean_question[end:] == pair.corrupted_question[start + len(pair.change.new) :]
        # both answers recomputed here from the question text alone
        edges, who, options = read_question(pair.clean_question)
        corrupted_edges, corrupted_who, corrupted_options = read_question(pair.corrupted_question)
        assert (who, set(options)) == (corrupted_who, set(corrupted_options)) == (pair.source["root"], {pair.source["target"], pair.source["neg_target"]})
        assert [o for o in options if o in reaches(edges, who)] == [pair.source["target"]]
        assert [o for o in options if o in reaches(corrupted_edges, who)] == [pair.source["neg_target"]]
        assert pair.clean_answer == f"{who} is a {pair.source['target']}." != pair.corrupted_answer == f"{who} is a {pair.source['neg_target']}."
        edge = pair.source["edited_edge"]
        assert Counter(edges) - Counter(corrupted_edges) == Counter([(edge["from"], edge["old"])])
        assert Counter(corrupted_edges) - Counter(edges) == Counter([(edge["from"], edge["new"])])
    assert sum(p.source["edited_edge"]["from"] == p.source["root"] for p in pairs) == 363  # every problem with a root edit gets one


def test_pairs_are_seeded_and_ranked(released):
    some = released[:60]
    assert prosqa_pairs(some, seed=0) == prosqa_pairs(some, seed=0)
    assert prosqa_pairs(some, seed=0) != prosqa_pairs(some, seed=1)
    everything = prosqa_pairs(some, per_problem=None)
    first = {p.source["index"]: p for p in everything if p.id.endswith("-0")}
    assert list(first.values()) == prosqa_pairs(some)
    by_problem: dict[int, list] = {}
    for p in everything:
        by_problem.setdefault(p.source["index"], []).append(p)
    for ranked in by_problem.values():
        root_edit = [p.source["edited_edge"]["from"] == p.source["root"] for p in ranked]
        assert root_edit == sorted(root_edit, reverse=True)  # root edits first
    with pytest.raises(ValueError, match="per_problem must be None"):
        prosqa_pairs(some, per_problem=0)


def test_a_good_share_of_pairs_aligns_under_gpt2(released, gpt2_tokenizer):
    counts = Counter()
    aligned = align(prosqa_pairs(released), gpt2_tokenizer, counts=counts, answer_prefix=ANSWER_PREFIX)
    # 431 of 642 (67%): the rest change the token count (" terpus" is 3 tokens, " scrompus" 4)
    assert (counts["in"], counts["kept"], counts["drop.length_changed"]) == (642, 431, 211)
    a = aligned[0]
    assert gpt2_tokenizer.decode(list(a.clean_answer_ids)) == " Tom is a lempus."
    assert gpt2_tokenizer.decode(list(a.corrupted_answer_ids)) == " Tom is a scrompus."
    assert a.first_diff == 3  # " Tom", " is", " a", then the concept
    # with every candidate, 621 of the 642 problems keep at least one aligned pair (97%)
    every = align(prosqa_pairs(released, per_problem=None), gpt2_tokenizer, answer_prefix=ANSWER_PREFIX)
    assert len({x.pair.source["index"] for x in every}) == 621


def test_string_answers_round_trip_through_the_pairs_file(released, tmp_path):
    pairs = prosqa_pairs(released[:20])
    save_pairs(tmp_path / "p.json", pairs, {"source": "prosqa"})
    loaded, _ = load_pairs(tmp_path / "p.json")
    assert loaded == pairs and all(isinstance(p.clean_answer, str) for p in loaded)
    data = json.loads((tmp_path / "p.json").read_text())
    data["pairs"][0]["corrupted_answer"] = 3.0
    (tmp_path / "mixed.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"pair #0 .* has a malformed field \(answers .* mix text and number"):
        load_pairs(tmp_path / "mixed.json")
    data["pairs"][0]["corrupted_answer"] = data["pairs"][0]["clean_answer"]
    (tmp_path / "same.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"has equal clean and corrupted answers \('\w+ is a \w+.'\)"):
        load_pairs(tmp_path / "same.json")


def test_the_generator_is_deterministic_and_its_problems_validate(released, tmp_path):
    problems = generate_prosqa(300, seed=3)
    assert problems == generate_prosqa(300, seed=3)
    assert generate_prosqa(10, seed=3) == problems[:10]
    assert generate_prosqa(10, seed=4) != problems[:10]
    save_prosqa(tmp_path / "gen.json", problems)
    assert load_prosqa(tmp_path / "gen.json") == problems  # each passes the loader's checks
    vocabulary = {s for p in released for s in p.idx_to_symbol}
    assert set(PERSONS) | set(CONCEPTS) == vocabulary
    for p in problems:
        assert set(p.idx_to_symbol) <= vocabulary and p.root in (0, 1)
        name = p.idx_to_symbol
        edges, who, options = read_question(p.question)
        assert sorted(edges) == sorted(named_edges(p)) and who == name[p.root] and set(options) == {name[p.target], name[p.neg_target]}
        assert [o for o in options if o in reaches(edges, who)] == [name[p.target]]
        assert 3 <= len(p.steps) <= 6 and {b for _, b in p.edges} | {a for a, _ in p.edges} == set(range(len(name)))
    options_first = Counter(read_question(p.question)[2][0] == p.idx_to_symbol[p.target] for p in problems)
    assert min(options_first.values()) > 100  # the options' order is random
    # the released statistics, roughly (released: nodes 22.8, edges 36.0, steps 3.77, people 2.56)
    assert 21.5 < statistics.mean(len(p.idx_to_symbol) for p in problems) < 24
    assert 33 < statistics.mean(len(p.edges) for p in problems) < 39
    assert 3.5 < statistics.mean(len(p.steps) for p in problems) < 4.1
    assert 2 < statistics.mean(sum(s[0].isupper() for s in p.idx_to_symbol) for p in problems) < 3.2
    assert len(prosqa_pairs(problems)) > 200  # and they make pairs too
    with pytest.raises(ValueError, match="n must be a non-negative"):
        generate_prosqa(-1, seed=0)
