"""The three-step task (Cywinski et al.) and the intermediate values every pair carries."""

from __future__ import annotations

import json

from interp.data import arithmetic_pairs, load_pairs, save_pairs, three_step_pairs
from interp.data.three_step import ThreeStepProblem


def test_values_and_spans_hand_worked():
    p = ThreeStepProblem("subtraction", 0, 7, 3, 5)
    assert p.values == [4, 20, 24]  # 7 - 3 = 4, 4 * 5 = 20, 4 + 20 = 24
    question, spans = p.render()
    assert question.startswith("A team starts with 7 members. 3 members leave the team. Then each remaining member recruits 5 ")
    assert [question[a:b] for a, b in spans] == ["7", "3", "5"]
    assert ThreeStepProblem("addition", 3, 7, 3, 5).values == [10, 50, 60]


def test_pairs_change_one_number_and_the_answer():
    for pair in three_step_pairs(200, seed=3):
        start, end = pair.change.span
        assert pair.clean_question[:start] == pair.corrupted_question[:start]
        assert pair.clean_question[end:] == pair.corrupted_question[end:]
        assert pair.clean_question[start:end] == pair.change.old != pair.change.new
        x, y, z = pair.source["corrupted_xyz"]
        assert 1 <= y < x <= 8 and 1 <= z <= 8
        step1 = x + y if pair.source["operation"] == "addition" else x - y
        assert pair.corrupted_intermediates == (step1, step1 * z, step1 + step1 * z)
        assert pair.clean_intermediates[-1] == pair.clean_answer != pair.corrupted_answer
        assert [a != b for a, b in zip(pair.source["clean_xyz"], pair.source["corrupted_xyz"])].index(True) == pair.changed_slot
    assert {p.changed_slot for p in three_step_pairs(60)} == {0, 1, 2}


def test_intermediates_round_trip_and_old_files_still_read(tmp_path):
    pairs = arithmetic_pairs(3) + three_step_pairs(2)
    save_pairs(tmp_path / "p.json", pairs, {"source": "test"})
    assert load_pairs(tmp_path / "p.json")[0] == pairs
    data = json.loads((tmp_path / "p.json").read_text())
    for record in data["pairs"]:  # a file written before the fields existed
        for key in ("clean_intermediates", "corrupted_intermediates", "changed_slot"):
            del record[key]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_pairs(tmp_path / "old.json")[0]
    assert old[:3] == pairs[:3]  # arithmetic: recovered from source (clean_values, changed_slot)
    assert old[0].clean_intermediates == tuple(float(v) for v in pairs[0].source["clean_values"])
    assert old[3].clean_intermediates == () and old[3].changed_slot is None
