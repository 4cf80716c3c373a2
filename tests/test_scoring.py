"""Scorers: SQuAD EM/F1, ROUGE, and fairseq-generate output parsing (hand-computed values)."""

import json

import pytest

from meo_fairseq.scoring import fairseq_output, rouge, squad
from meo_fairseq.scoring.fairseq_output import decode_sentencepiece, parse_generate_output, read_hypotheses
from meo_fairseq.scoring.rouge import rouge_scores
from meo_fairseq.scoring.squad import exact_match_score, f1_score, normalize_answer, squad_scores

# ----------------------------------------------------------------------------- SQuAD


def test_normalize_answer_official_rules():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    # articles only as whole words; punctuation removed before article removal, like the official script
    assert normalize_answer("Theatre anatomy") == "theatre anatomy"
    assert normalize_answer("the-end") == "theend"
    assert normalize_answer("  A\tB\nC ") == "b c"


def test_em_f1_hand_computed():
    # "the Cat sat" -> "cat sat" (2 tokens); "a cat sat on" -> "cat sat on" (3 tokens); overlap 2
    # precision 2/2, recall 2/3, F1 = 2 * (1 * 2/3) / (1 + 2/3) = 0.8
    assert exact_match_score("the Cat sat", "a cat sat on") == 0.0
    assert f1_score("the Cat sat", "a cat sat on") == pytest.approx(0.8)
    assert exact_match_score("The cat sat.", "cat sat") == 1.0
    assert f1_score("dog", "cat") == 0.0
    # tokens are a multiset: {x: 2, y: 1} & {x: 1, y: 2} = 2 common tokens of 3 -> P = R = F1 = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)


def test_squad_scores_max_over_references_and_missing():
    refs = {"q1": ["a cat sat on", "the Cat sat"], "q2": ["Paris"], "q3": ["blue whale"]}
    preds = {"q1": "the Cat sat", "q2": "paris france"}  # q3 unanswered -> 0
    scores = squad_scores(preds, refs)
    # q1: EM 1 (second reference), F1 1; q2: EM 0, F1 = 2*(1/2*1)/(1/2+1) = 2/3; q3: 0
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["num_questions"] == 3 and scores["num_unanswered"] == 1
    with pytest.raises(ValueError, match="not in the references"):
        squad_scores({"nope": "x"}, refs)


def test_squad_cli_ids_and_json_refs(tmp_path, capsys):
    (tmp_path / "hyp.txt").write_text("the Cat sat\nLondon\n", encoding="utf-8")
    (tmp_path / "ids.txt").write_text("q1\nq2\n", encoding="utf-8")
    refs = tmp_path / "dev.answers.jsonl"
    refs.write_text(
        json.dumps({"id": "q1", "answers": ["a cat sat on"]})
        + "\n"
        + json.dumps({"id": "q2", "answers": ["london", "London, UK"]})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "scores.json"
    assert (
        squad.main(
            [
                "--hyp",
                str(tmp_path / "hyp.txt"),
                "--ids",
                str(tmp_path / "ids.txt"),
                "--ref",
                str(refs),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    scores = json.loads(out.read_text())
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (0.8 + 1.0) / 2)
    assert json.loads(capsys.readouterr().out) == scores

    # the same references as a SQuAD v1.1 JSON file, predictions as an official-style JSON dict
    squad_json = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "c",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "?",
                                "answers": [{"text": "a cat sat on", "answer_start": 0}],
                            },
                            {"id": "q2", "question": "?", "answers": [{"text": "london", "answer_start": 0}]},
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "dev.json").write_text(json.dumps(squad_json), encoding="utf-8")
    (tmp_path / "pred.json").write_text(json.dumps({"q1": "the Cat sat", "q2": "London"}), encoding="utf-8")
    assert (
        squad.main(
            ["--hyp", str(tmp_path / "pred.json"), "--ref", str(tmp_path / "dev.json"), "--out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text()) == scores


def test_squad_cli_length_mismatch_fails(tmp_path):
    (tmp_path / "hyp.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "ids.txt").write_text("q1\n", encoding="utf-8")
    (tmp_path / "ref.jsonl").write_text(json.dumps({"id": "q1", "answers": ["a"]}) + "\n", encoding="utf-8")
    assert (
        squad.main(
            [
                "--hyp",
                str(tmp_path / "hyp.txt"),
                "--ids",
                str(tmp_path / "ids.txt"),
                "--ref",
                str(tmp_path / "ref.jsonl"),
            ]
        )
        == 2
    )


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_identical_and_disjoint():
    same = rouge_scores(["the cat sat on the mat", "a b c"], ["the cat sat on the mat", "a b c"])
    assert same["rouge1"] == pytest.approx(100.0)
    assert same["rouge2"] == pytest.approx(100.0)
    assert same["rougeL"] == pytest.approx(100.0)
    assert same["num_examples"] == 2
    disjoint = rouge_scores(["alpha beta gamma"], ["delta epsilon zeta"])
    assert disjoint["rouge1"] == disjoint["rouge2"] == disjoint["rougeL"] == 0.0


def test_rouge_partial_hand_computed():
    # hyp: the cat sat on the mat / ref: the cat lay on the rug (6 tokens each)
    # unigram overlap {the x2, cat, on} = 4 -> P = R = F = 4/6
    # bigrams: 5 each, overlap {the cat, on the} = 2 -> F = 2/5
    # LCS "the cat on the" = 4 -> F = 4/6
    s = rouge_scores(["the cat sat on the mat"], ["the cat lay on the rug"])
    assert s["rouge1"] == pytest.approx(100 * 4 / 6)
    assert s["rouge2"] == pytest.approx(100 * 2 / 5)
    assert s["rougeL"] == pytest.approx(100 * 4 / 6)
    # different lengths: hyp 3 tokens, ref 6: R1 P=1, R=1/2 -> F=2/3; R2 P=2/2, R=2/5 -> F=4/7
    s = rouge_scores(["the cat sat"], ["The cat sat on the mat."])
    assert s["rouge1"] == pytest.approx(100 * 2 / 3)
    assert s["rouge2"] == pytest.approx(100 * 4 / 7)


def test_rouge_uses_stemmer():
    # stemmed: hyp [run, dog], ref [the, dog, run]: R1 P=1, R=2/3 -> F=0.8; LCS 1 -> P=1/2, R=1/3 -> F=0.4
    s = rouge_scores(["running dogs"], ["the dog runs"])
    assert s["rouge1"] == pytest.approx(80.0)
    assert s["rougeL"] == pytest.approx(40.0)
    assert rouge_scores(["running dogs"], ["the dog runs"], use_stemmer=False)["rouge1"] == 0.0


def test_rouge_length_mismatch():
    with pytest.raises(ValueError):
        rouge_scores(["a", "b"], ["a"])


def test_rouge_cli(tmp_path, capsys):
    (tmp_path / "hyp.txt").write_text("the cat sat on the mat\nalpha\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("the cat lay on the rug\nalpha\n", encoding="utf-8")
    out = tmp_path / "sub" / "rouge.json"
    assert (
        rouge.main(
            ["--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"), "--out", str(out)]
        )
        == 0
    )
    scores = json.loads(out.read_text())
    assert scores["rouge1"] == pytest.approx(100 * (4 / 6 + 1) / 2)
    assert scores["num_examples"] == 2
    assert json.loads(capsys.readouterr().out) == scores


# ----------------------------------------------------------------------------- fairseq-generate output

GENERATE_OUTPUT = """\
S-2\t▁third ▁source
T-2\t▁third ▁target
H-2\t-0.31\t▁The ▁third s ▁one
D-2\t-0.31\tThe thirds one
P-2\t-0.1 -0.2 -0.3 -0.4
H-2\t-0.90\t▁worse ▁hypothesis
S-0\t▁first
H-0\t-0.12\t▁First ▁hypothesis .
D-0\t-0.12\tFirst hypothesis.
2024-01-01 12:00:00 | INFO | fairseq_cli.generate | NOTE: hypothesis and token scores are output in base 2
H-1\t-1.5\t
H-10\t-0.7\t▁ten
Generate test with beam=4: BLEU4 = 1.00
"""


def test_parse_generate_output_orders_by_id_and_keeps_best():
    by_id = parse_generate_output(GENERATE_OUTPUT.splitlines())
    assert sorted(by_id) == [0, 1, 2, 10]
    assert by_id[2] == "▁The ▁third s ▁one"  # first (best) of the nbest lines
    assert by_id[1] == ""
    assert parse_generate_output(GENERATE_OUTPUT.splitlines(), kind="D")[0] == "First hypothesis."


def test_read_hypotheses_decodes_and_checks_ids(tmp_path):
    path = tmp_path / "gen.out"
    path.write_text(GENERATE_OUTPUT, encoding="utf-8")
    hyps = read_hypotheses(str(path), num=11, allow_missing=True)
    assert hyps[:3] == ["First hypothesis.", "", "The thirds one"]
    assert hyps[3:10] == [""] * 7 and hyps[10] == "ten"
    with pytest.raises(ValueError, match="no H- line"):
        read_hypotheses(str(path), num=11)
    with pytest.raises(ValueError, match="not below"):
        read_hypotheses(str(path), num=3)
    assert read_hypotheses(["H-1\t0\talready decoded", "H-0\t0\tx y"]) == ["x y", "already decoded"]
    assert read_hypotheses(["H-0\t0\t▁a ▁b"], decode="none") == ["▁a ▁b"]


def test_decode_sentencepiece_matches_fairseq_rule():
    assert decode_sentencepiece("▁Hello ▁wor ld ▁!") == "Hello world !"
    assert decode_sentencepiece("") == ""


def test_fairseq_output_cli(tmp_path):
    (tmp_path / "gen.out").write_text("H-1\t-1\t▁b ▁c\nH-0\t-1\t▁a\n", encoding="utf-8")
    (tmp_path / "test.id").write_text("x\ny\n", encoding="utf-8")
    out = tmp_path / "hyp.txt"
    assert (
        fairseq_output.main(
            [str(tmp_path / "gen.out"), "--ids", str(tmp_path / "test.id"), "--out", str(out)]
        )
        == 0
    )
    assert out.read_text(encoding="utf-8") == "a\nb c\n"
    (tmp_path / "test.id").write_text("x\ny\nz\n", encoding="utf-8")
    assert (
        fairseq_output.main(
            [str(tmp_path / "gen.out"), "--ids", str(tmp_path / "test.id"), "--out", str(out)]
        )
        == 2
    )
