"""BLEU-4, CIDEr-D and recall@k against values worked out by hand (derivations in comments)."""
import math

import numpy as np
import pytest

from vlm_jax.eval import captions as cm


def test_tokenize_lowercases_and_drops_punctuation():
    assert cm.tokenize("A red, Circle. It's_here!") == ["a", "red", "circle", "it's", "here"]


def test_bleu4_hand_computed():
    # hyp  "the cat sat on the mat"  vs  ref "the cat sat on a mat" (both 6 words: BP = 1)
    # 1-grams: the(2, ref has 1 -> clipped 1) cat sat on mat -> 5/6
    # 2-grams: the cat, cat sat, sat on | on the, the mat      -> 3/5
    # 3-grams: the cat sat, cat sat on | sat on the, on the mat -> 2/4
    # 4-grams: the cat sat on | cat sat on the, sat on the mat  -> 1/3
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert cm.bleu4(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.537285, abs=1e-6)


def test_bleu4_brevity_penalty_uses_the_closest_reference():
    # hyp of 4 words, every n-gram matches; closest reference length 6 (not 9): BP = exp(1 - 6/4)
    refs = [["the cat sat on the mat", "the cat sat on the mat over there today"]]
    assert cm.bleu4(["the cat sat on"], refs) == pytest.approx(math.exp(-0.5))
    # a longer hypothesis than every reference is not penalised
    assert cm.bleu4(["a b c d e"], [["a b c d"]]) == pytest.approx(
        (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu4_is_a_corpus_score_with_clipping_over_references():
    # "the the the the" vs refs "the cat" / "the the": 1-grams clipped to the larger count 2 -> 2/4,
    # 2-grams "the the" x3 clipped to 1 -> 1/3, 3-grams 0/2 -> BLEU 0 (no smoothing)
    assert cm.bleu4(["the the the the"], [["the cat", "the the"]]) == 0.0
    # corpus sums: hyp 1 matches everything (4 words), hyp 2 shares nothing with its reference
    # 1-grams 4/6, 2-grams 3/4 (hyp 2 has one 2-gram), 3-grams 2/2, 4-grams 1/1; lengths 6 = 6
    score = cm.bleu4(["a b c d", "x y"], [["a b c d"], ["p q"]])
    assert score == pytest.approx((4 / 6 * 3 / 4 * 1 * 1) ** 0.25)
    with pytest.raises(ValueError, match="reference sets"):
        cm.bleu4(["a"], [["a"], ["b"]])


def test_cider_d_hand_computed():
    # Two images, N = 2: idf = log 2 - log(max(1, df)); "a" is in both reference sets -> weight 0.
    # hyp 1 "a b b" vs ref "a b":
    #   n=1: h = {a: 0, b: 2 log2}, r = {a: 0, b: log2}: sum min(h, r) r = log2^2,
    #        |h| |r| = 2 log2 * log2 -> 1/2
    #   n=2: h = {a b: log2, b b: log2 (df 0 -> weight log2)}, r = {a b: log2} -> 1/sqrt(2)
    #   n=3: the reference has no 3-gram -> 0; n=4: none -> 0
    #   length penalty exp(-(3 - 2)^2 / (2 * 6^2)); score = 10 * penalty * (1/2 + 1/sqrt2) / 4
    # hyp 2 "a d" vs ref "a c": only "a" is shared and weighs 0 -> 0
    first = 10 * math.exp(-1 / 72) * (0.5 + 2 ** -0.5) / 4
    per_sentence = cm.cider_d_per_sentence(["a b b", "a d"], [["a b"], ["a c"]])
    np.testing.assert_allclose(per_sentence, [first, 0.0], rtol=1e-12)
    assert cm.cider_d(["a b b", "a d"], [["a b"], ["a c"]]) == pytest.approx(first / 2)


def test_cider_d_perfect_unique_captions_score_ten_and_references_average():
    assert cm.cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]) == pytest.approx(10.0)
    # a second reference sharing nothing with the hypothesis halves the score
    both = cm.cider_d_per_sentence(["a b c d", "e f g h"], [["a b c d", "x y z w"], ["e f g h"]])
    assert both[0] == pytest.approx(5.0)


def test_recall_at_k_hand_computed():
    similarity = np.array([[0.9, 0.1, 0.5],    # query 0: its match (0) ranks first
                           [0.2, 0.3, 0.8],    # query 1: match 1 ranks second
                           [0.1, 0.7, 0.6]])   # query 2: match 2 ranks second
    recall = cm.recall_at_k(similarity, np.eye(3, dtype=bool), ks=(1, 2, 3))
    assert recall == {1: pytest.approx(1 / 3), 2: 1.0, 3: 1.0}
    # ties rank the lower index first; several relevant candidates: the best one counts
    tied = cm.recall_at_k(np.zeros((1, 3)), np.array([[False, False, True]]), ks=(1, 3))
    assert tied == {1: 0.0, 3: 1.0}
    with pytest.raises(ValueError, match="relevant"):
        cm.recall_at_k(similarity, np.zeros((3, 3), bool))
