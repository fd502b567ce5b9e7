"""Metrics against hand-computed values and published / reference-implementation examples."""

import math

import pytest

from smolvlm.errors import DataError
from smolvlm.eval import metrics as M


@pytest.mark.parametrize("text, expected", [
    ("Three.", "3"),
    ("  The  RED circle! ", "red circle"),
    ("twenty-one", "21"),
    ("Twenty one apples", "21 apples"),
    ("an orange star, and a blue square", "orange star and blue square"),
    ("1,000", "1000"),
    ("It is 3.5 cm.", "it is 3.5 cm"),
    ("Don't", "dont"),
    ("zero", "0"),
    ("OPEN 24", "open 24"),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_exact_match():
    assert M.exact_match("Yes.", "yes")
    assert M.exact_match("three", "3")
    assert M.exact_match("A blue square", ["red", "blue square"])
    assert not M.exact_match("4", "3")
    assert not M.exact_match("left", "right")
    assert not M.exact_match("red circle", "red")
    with pytest.raises(DataError):
        M.exact_match("x", [])


def test_parse_boxes():
    text = ("<ref>red circle</ref><box>(10,20),(30,40)</box><box>(1,2),(3,4)</box>"
            " then <ref>star</ref><box>(50, 60), (5,6)</box>")
    assert M.parse_boxes(text) == [("red circle", (10, 20, 30, 40)), ("red circle", (1, 2, 3, 4)),
                                   ("star", (5, 6, 50, 60))]
    assert M.parse_box("the box is (100,200),(300,400).") == (100, 200, 300, 400)
    assert M.parse_box("[1.5, 2, 3, 4]") == (1.5, 2, 3, 4)
    assert M.parse_box("no box here") is None
    assert M.parse_boxes("<box>garbage</box> (1,2),(3,4)") == []  # tagged text: only boxes inside tags count


def test_box_iou_hand_values():
    assert M.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert M.box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert M.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_grounding_hit_threshold():
    ref = "<ref>red circle</ref><box>(100,100),(300,300)</box>"
    assert M.grounding_hit("<ref>red circle</ref><box>(100,100),(300,300)</box>", ref)
    # shifted by 50 along x: IoU = 150*200 / (2*40000 - 30000) = 0.6
    assert M.grounding_hit("<box>(150,100),(350,300)</box>", ref)
    # shifted by 100: IoU = 100*200 / (80000 - 20000) = 1/3
    assert not M.grounding_hit("<box>(200,100),(400,300)</box>", ref)
    assert M.grounding_hit("<box>(200,100),(400,300)</box>", ref, threshold=0.3)
    assert not M.grounding_hit("I cannot see it", ref)
    assert M.grounding_hit((100, 100, 300, 300), (100, 100, 300, 300))
    with pytest.raises(DataError, match="holds no box"):
        M.grounding_hit("<box>(1,1),(2,2)</box>", "red circle")


def test_vqa_accuracy_ten_annotators():
    # k of 10 annotators agree with the prediction: 0, 0.3, 0.6, 0.9, then 1.0 (the leave-one-out min(k/3, 1))
    others = ["cat", "dog", "bird", "fish", "cow", "pig", "hen", "owl", "ant", "bee"]
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["2"] * k + others[: 10 - k]
        assert M.vqa_accuracy("2", answers) == pytest.approx(expected)
    # the official normalisation: number words, articles, trailing period, punctuation
    assert M.vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert M.vqa_accuracy("the cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("yes", ["yes"]) == 1.0 and M.vqa_accuracy("no", ["yes"]) == 0.0


def test_vqa_normalize_official_rules():
    assert M.vqa_normalize("Two dogs.") == "2 dogs"
    assert M.vqa_normalize("none") == "0"
    assert M.vqa_normalize("an apple") == "apple"
    assert M.vqa_normalize("dont") == M.vqa_normalize("don\u2019t") == "don\u2019t"  # contractions table
    assert M.vqa_normalize("don't") == "don t"  # an apostrophe not beside a space becomes a space
    assert M.vqa_normalize("1,000 people") == "1000 people"  # digit,digit: punctuation deleted everywhere
    assert M.vqa_normalize("red, white") == "red white"  # ', ' deletes the comma
    assert M.vqa_normalize("3.5") == "3.5" and M.vqa_normalize("yes!") == "yes!"  # '!' is not in the list


def test_anls_published_examples():
    # ST-VQA paper (Biten et al. 2019), ground truths "Coca Cola" and "Coca Cola Company"
    gts = ["Coca Cola", "Coca Cola Company"]
    assert M.anls("Coca cola", gts) == 1.0
    assert M.anls("CocaCola", gts) == pytest.approx(1 - 1 / 9)  # 0.89
    assert M.anls("The Coca", gts) == 0.0  # similarities 0.44 / 0.29 fall under the threshold
    assert M.anls("Cola", gts) == 0.0
    assert M.anls("Cat", gts) == 0.0


def test_anls_edge_cases():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.anls("abc", "abd") == pytest.approx(2 / 3)
    assert M.anls("ab", "ac") == 0.0  # NL exactly 0.5 is not below the threshold
    assert M.anls("ab", "ac", threshold=0.6) == 0.5
    assert M.anls("", "") == 1.0
    assert M.anls("", "abc") == 0.0
    assert M.anls("  Hello   World ", "hello world") == 1.0  # case and extra spaces do not count


def test_cider_tokenize():
    assert M.cider_tokenize('A dog\'s ball. "Don\'t" (well-known) 3.5 ...') == \
        ["a", "dog", "'s", "ball", "do", "n't", "well-known", "3.5"]


def test_cider_hand_computed():
    # Two images; "a" occurs in both reference sets (idf 0), every other n-gram in one (idf log 2).
    score, scores = M.cider_d(["a cat sits", "a dog runs"], [["a cat sits"], ["a dog runs"]])
    # orders 1-3 match exactly (cosine 1), no 4-grams (0): 10 * (1 + 1 + 1 + 0) / 4
    assert scores == pytest.approx([7.5, 7.5]) and score == pytest.approx(7.5)
    # a longer candidate: one extra bigram -> penalty exp(-1 / 72); cosines 2/sqrt(6), 2/sqrt(6), 1/sqrt(2), 0
    _, scores = M.cider_d(["a cat sits down", "a dog runs"], [["a cat sits"], ["a dog runs"]])
    expected = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    assert scores[0] == pytest.approx(expected)


def test_cider_matches_pycocoevalcap():
    # Reference values: pycocoevalcap 1.2 `Cider().compute_score` on these (already tokenized) captions.
    cands = ["a man is riding a horse on the beach", "two dogs play with a red ball in the grass",
             "a plate of food with broccoli", "the the the cat"]
    refs = [["a man rides a horse along the beach", "a person riding a brown horse on sand",
             "man on horseback at the beach"],
            ["two dogs are playing with a ball", "a pair of dogs chase a red ball on grass"],
            ["a plate with broccoli and meat", "a white plate of food", "broccoli and rice on a plate",
             "a meal on a plate"],
            ["the cat sits on the mat", "a cat on a mat"]]
    score, scores = M.cider_d(cands, refs)
    assert score == pytest.approx(1.898005257037103, abs=1e-12)
    assert scores == pytest.approx([1.8452646387589835, 2.0358982348443138, 2.334935588084832, 1.3759225664602837],
                                   abs=1e-12)
    with pytest.raises(DataError):
        M.cider_d(["x"], [])


def test_score_dispatch_and_aggregate():
    assert M.score("count", "Three", "3") == 1.0
    assert M.score("spatial", "right", "left") == 0.0
    assert M.score("grounding", "<ref>x</ref><box>(0,0),(10,10)</box>", "<ref>x</ref><box>(0,0),(10,11)</box>") == 1.0
    assert M.score("vqav2", "2", ["2", "2", "3"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert M.score("docvqa", "CocaCola", ["Coca Cola"]) == pytest.approx(8 / 9)
    table = M.aggregate([("count", 1.0), ("count", 0.0), ("colour", 1.0), ("count", 1.0)])
    assert table["count"] == {"n": 3, "score": pytest.approx(2 / 3)}
    assert table["colour"] == {"n": 1, "score": 1.0}
    assert table["all"]["n"] == 4 and table["all"]["score"] == 0.75
    assert table["all"]["macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert M.aggregate([])["all"] == {"n": 0, "score": 0.0, "macro": 0.0}
