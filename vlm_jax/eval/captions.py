"""Captioning and retrieval metrics: corpus BLEU-4, CIDEr-D, and recall@k of a similarity matrix.

    bleu4(["a red circle"], [["a red circle", "one red circle"]])   # -> 1.0
    cider_d(hypotheses, references)                                   # COCO scale (x10)
    recall_at_k(similarity, relevant, ks=(1, 5))                      # {1: r1, 5: r5}

Both caption metrics follow the COCO caption evaluation's definitions (Papineni et al. 2002;
Vedantam et al. 2015, the "-D" variant everyone reports as CIDEr); each hypothesis has one or
more references. Text is lower-cased, punctuation dropped and split on whitespace (`tokenize`);
COCO's scripts use the Stanford PTB tokenizer, which splits plain English captions the same way.

BLEU-4, corpus level: n-gram precisions p_1..p_4 are summed over the whole corpus, each candidate
n-gram count clipped by its largest count in any one reference; brevity penalty
BP = exp(1 - r / c) if c < r, else 1, with c the total candidate length and r the sum of each
candidate's closest reference length (ties: the shorter). BLEU = BP * (p_1 p_2 p_3 p_4)^(1/4);
no smoothing, so a corpus without one matching 4-gram scores 0.

CIDEr-D: every sentence becomes one tf-idf vector per n = 1..4 (raw n-gram count times
log(N / df), N = number of hypotheses, df = how many of their reference sets contain the n-gram,
at least 1). Per n, the similarity to a reference is sum_g min(h_g, r_g) * r_g / (|h| |r|)
(the "clipped" cosine) times a length penalty exp(-(len_h - len_r)^2 / (2 * 6^2)); a sentence's
score is 10 x the mean over n of its mean over references, and the corpus score the mean over
sentences.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence

import numpy as np

MAX_ORDER = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0


def tokenize(text: str) -> list[str]:
    """Lower case, every character that is not a letter, digit, apostrophe or space dropped."""
    return re.sub(r"[^\w\s']|_", " ", text.lower()).split()


def ngrams(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"hypothesis {empty[0]} has no reference")


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] of `hypotheses[i]` against the set `references[i]`."""
    _check_lengths(hypotheses, references)
    matched = np.zeros(MAX_ORDER)
    total = np.zeros(MAX_ORDER)
    hypothesis_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        words = tokenize(hypothesis)
        ref_words = [tokenize(r) for r in refs]
        hypothesis_length += len(words)
        reference_length += min((len(r) for r in ref_words),
                                key=lambda length: (abs(length - len(words)), length))
        for n in range(1, MAX_ORDER + 1):
            counts = ngrams(words, n)
            max_ref = collections.Counter()
            for r in ref_words:
                max_ref |= ngrams(r, n)  # elementwise max of the counts
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if np.any(matched == 0):
        return 0.0
    log_precision = np.mean(np.log(matched / total))
    brevity = 1.0 if hypothesis_length >= reference_length else \
        math.exp(1.0 - reference_length / hypothesis_length)
    return float(brevity * math.exp(log_precision))


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (COCO scale: a hypothesis equal to all its references, none of whose
    n-grams occur elsewhere, scores 10)."""
    return float(np.mean(cider_d_per_sentence(hypotheses, references)))


def cider_d_per_sentence(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                         ) -> np.ndarray:
    """f64[N]: each hypothesis' CIDEr-D, document frequencies taken over all N reference sets."""
    _check_lengths(hypotheses, references)
    hyp_words = [tokenize(h) for h in hypotheses]
    ref_words = [[tokenize(r) for r in refs] for refs in references]
    counts = [[_all_ngrams(w) for w in refs] for refs in ref_words]
    document_frequency = collections.Counter()
    for ref_counts in counts:
        document_frequency.update(set().union(*(c.keys() for c in ref_counts)))
    log_n = math.log(len(hypotheses))

    def vectors(gram_counts: collections.Counter):
        """Per order n: ({ngram: tf-idf}, norm)."""
        out = [({}, 0.0) for _ in range(MAX_ORDER)]
        for gram, count in gram_counts.items():
            weight = count * (log_n - math.log(max(1.0, document_frequency[gram])))
            out[len(gram) - 1][0][gram] = weight
        return [(vec, math.sqrt(sum(v * v for v in vec.values()))) for vec, _ in out]

    scores = np.zeros(len(hypotheses))
    for index, (words, refs) in enumerate(zip(hyp_words, ref_words)):
        hyp_vectors = vectors(_all_ngrams(words))
        total = 0.0
        for ref, ref_counts in zip(refs, counts[index]):
            penalty = math.exp(-((len(words) - len(ref)) ** 2) / (2 * CIDER_SIGMA ** 2))
            for (h_vec, h_norm), (r_vec, r_norm) in zip(hyp_vectors, vectors(ref_counts)):
                if h_norm == 0 or r_norm == 0:
                    continue
                dot = sum(min(w, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, w in h_vec.items())
                total += penalty * dot / (h_norm * r_norm)
        scores[index] = CIDER_SCALE * total / (MAX_ORDER * len(refs))
    return scores


def _all_ngrams(words: Sequence[str]) -> collections.Counter:
    grams = collections.Counter()
    for n in range(1, MAX_ORDER + 1):
        grams.update(ngrams(words, n))
    return grams


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5)
                ) -> dict[int, float]:
    """similarity f[Q, C] (higher = closer), relevant bool[Q, C] -> {k: fraction of queries with
    a relevant candidate among their k most similar}. Ties rank the lower index first."""
    similarity, relevant = np.asarray(similarity), np.asarray(relevant, bool)
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} must be "
                         f"the same [queries, candidates] shape")
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)  # [Q, C] in rank order
    first_hit = hits.argmax(axis=1)                     # rank of the best relevant candidate
    return {k: float(np.mean(first_hit < k)) for k in ks}
