"""Scoring: answer normalisation, exact match, grounding IoU, and the public-benchmark metrics.

- Short answers (our synthetic tasks): `normalize_answer` then `exact_match`; boxes in Qwen-VL style
  (`<ref>red circle</ref><box>(x1,y1),(x2,y2)</box>`, coordinates in [0, 1000)) by IoU in `grounding_hit`.
- VQAv2: the official 10-annotator accuracy, min(#other annotators who gave the answer / 3, 1) averaged over the
  annotators, after the official answer normalisation (punctuation, number words, articles, contractions).
- DocVQA / ST-VQA: ANLS, the normalised Levenshtein similarity, zeroed when the distance reaches a threshold (0.5).
- Captioning: CIDEr-D as pycocoevalcap computes it (tf-idf n-grams 1-4 with document frequencies over the
  reference corpus, clipped counts, gaussian length penalty with sigma 6, x10).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

from smolvlm.errors import DataError

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2

# ----------------------------------------------------------------------------------------------- short answers

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
          "seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_ARTICLES = {"a", "an", "the"}


def _number_words_to_digits(words: list[str]) -> list[str]:
    """'seven' -> '7', 'twenty one' -> '21'; other words unchanged."""
    out: list[str] = []
    i = 0
    while i < len(words):
        value = _NUMBER_WORDS.get(words[i])
        if value is None:
            out.append(words[i])
        else:
            if value >= 20 and i + 1 < len(words) and 0 < _NUMBER_WORDS.get(words[i + 1], 10) < 10:
                i += 1
                value += _NUMBER_WORDS[words[i]]
            out.append(str(value))
        i += 1
    return out


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (keeping decimal points), articles and extra spaces; number words to digits."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = text.replace("'", "")  # don't -> dont
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # periods go, decimal points stay
    text = re.sub(r"[^\w\s.]|_", " ", text)
    return " ".join(w for w in _number_words_to_digits(text.split()) if w not in _ARTICLES)


def _as_list(ref: str | Sequence[str]) -> list[str]:
    """One reference or several, as a non-empty list."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise DataError("a scoring reference list is empty; give at least one reference answer")
    return refs


def exact_match(pred: str, ref: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals the (or any) normalised reference."""
    p = normalize_answer(pred)
    return any(p == normalize_answer(r) for r in _as_list(ref))


# ----------------------------------------------------------------------------------------------- grounding

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_PAIR_BOX = re.compile(rf"\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)")  # (x1,y1),(x2,y2)
_LIST_BOX = re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]")  # [x1, y1, x2, y2]
_TAG = re.compile(r"<ref>(.*?)</ref>|<box>(.*?)</box>", re.S)


def _ordered(values: Sequence[str]) -> Box:
    """Four coordinates as a box with its corners sorted."""
    x1, y1, x2, y2 = (float(v) for v in values)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _bare_boxes(text: str) -> list[Box]:
    """Every '(x1,y1),(x2,y2)' or '[x1, y1, x2, y2]' in the text, in order."""
    found = [(m.start(), _ordered(m.groups())) for pattern in (_PAIR_BOX, _LIST_BOX) for m in pattern.finditer(text)]
    return [box for _, box in sorted(found)]


def parse_boxes(text: str) -> list[tuple[str | None, Box]]:
    """(phrase, box) pairs from Qwen-VL style text; boxes outside <box> tags are read when there are no tags."""
    pairs: list[tuple[str | None, Box]] = []
    phrase: str | None = None
    tagged = False
    for m in _TAG.finditer(text):
        if m.group(1) is not None:
            phrase = m.group(1).strip()
        else:
            tagged = True
            pairs.extend((phrase, box) for box in _bare_boxes(m.group(2)))
    if not tagged:
        pairs = [(None, box) for box in _bare_boxes(text)]
    return pairs


def parse_box(text: str) -> Box | None:
    """The first box in the text, or None."""
    pairs = parse_boxes(text)
    return pairs[0][1] if pairs else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(pred: str | Sequence[float], ref: str | Sequence[float], threshold: float = 0.5) -> bool:
    """True when the first predicted box overlaps the reference box with IoU >= threshold."""
    ref_box = parse_box(ref) if isinstance(ref, str) else tuple(ref)
    if ref_box is None:
        raise DataError(f"grounding reference {ref!r} holds no box; write it as <box>(x1,y1),(x2,y2)</box>")
    pred_box = parse_box(pred) if isinstance(pred, str) else tuple(pred)
    return pred_box is not None and box_iou(pred_box, ref_box) >= threshold


# ----------------------------------------------------------------------------------------------- VQA accuracy

# The punctuation list of the official script (GT-Vision-Lab/VQA); '.', '!' and '-' are not in it.
_VQA_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
_VQA_NUMBERS = {"none": "0"} | {w: str(i) for i, w in enumerate(_UNITS[:11])}
# The official table maps contractions typed without apostrophes ("dont") to their spelling with a right single
# quote ("don’t"). It is rebuilt here from the forms: every apostrophe-less variant of a form maps to the form.
_CONTRACTION_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    """Each form without any non-empty subset of its apostrophes -> the form with right single quotes."""
    table: dict[str, str] = {}
    for form in _CONTRACTION_FORMS:
        pieces = form.split("'")
        joints = len(pieces) - 1
        curly = "\u2019".join(pieces)
        for keep in range(2**joints - 1):  # bit j set: apostrophe j stays
            key = pieces[0] + "".join(("\u2019" if keep >> j & 1 else "") + pieces[j + 1] for j in range(joints))
            table[key] = curly
    return table


_CONTRACTIONS = _contraction_table()


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation (processPunctuation then processDigitArticle)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation next to a space, or anywhere in a text with a digit-comma-digit, is deleted; otherwise it
    # becomes a space. The checks look at the original text.
    delete = re.search(r"\d,\d", text) is not None
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if delete or f"{p} " in text or f" {p}" in text else " ")
    out = re.sub(r"\.(?!\d)", "", out)  # periods go unless a digit follows
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (normally 10): mean over annotators i of
    min(1, #{j != i: answer_j == pred} / 3)."""
    answers = _as_list(answers)
    p = vqa_normalize(pred)
    matches = [vqa_normalize(a) == p for a in answers]
    if len(answers) == 1:  # the leave-one-out average is undefined for a single answer: plain exact match
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


# ----------------------------------------------------------------------------------------------- ANLS

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(pred: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction: the best over answers of 1 - NL(pred, answer), or 0 where NL >= threshold.
    NL is the edit distance over the longer length, after lowercasing and collapsing whitespace."""
    p = " ".join(pred.strip().lower().split())
    best = 0.0
    for answer in _as_list(answers):
        a = " ".join(answer.strip().lower().split())
        longest = max(len(p), len(a))
        distance = levenshtein(p, a) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# ----------------------------------------------------------------------------------------------- CIDEr-D

# What pycocoevalcap's PTB tokenizer output loses: punctuation tokens (brackets and quotes become such tokens).
_CIDER_DROP = {"'", "`", "''", "``", ".", "?", "!", ",", ":", ";", "-", "--", "...", "(", ")", "{", "}", '"'}
_WORD = r"[^\W_]+(?:[-./][^\W_]+)*"  # words, hyphenated words, decimals
_CIDER_TOKEN = re.compile(rf"n't|'[^\W_]+|{_WORD}(?=n't)|{_WORD}|\.\.\.|--|\S")  # "don't" -> do n't


def cider_tokenize(text: str) -> list[str]:
    """Lowercased PTB-like tokens without punctuation: "A dog's ball." -> ['a', 'dog', "'s", 'ball']."""
    return [t for t in _CIDER_TOKEN.findall(text.lower()) if t not in _CIDER_DROP]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
            ) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-candidate scores; document frequencies come from the references given."""
    if len(candidates) != len(references) or not candidates:
        raise DataError(f"CIDEr needs one reference list per candidate ({len(candidates)} candidates, "
                        f"{len(references)} reference lists) and at least one candidate")
    cands = [_ngrams(cider_tokenize(c), n) for c in candidates]
    refs = [[_ngrams(cider_tokenize(r), n) for r in _as_list(rs)] for rs in references]
    doc_freq = Counter(g for rs in refs for g in {g for r in rs for g in r})
    log_docs = math.log(len(refs))

    def vector(counts: Counter) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        """Per n-gram order: tf-idf weights and their norm; and the length pycocoevalcap uses (its bigram count)."""
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for cand, rs in zip(cands, refs):
        vec, norm, length = vector(cand)
        total = [0.0] * n
        for r in rs:
            rvec, rnorm, rlength = vector(r)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())  # clipped
                if norm[k] and rnorm[k]:
                    dot /= norm[k] * rnorm[k]
                total[k] += dot * penalty
        scores.append(10.0 * sum(total) / n / len(rs))
    return sum(scores) / len(scores), scores


# ----------------------------------------------------------------------------------------------- dispatch

VQA_TASKS = ("vqa", "vqav2", "textvqa", "vizwiz")
ANLS_TASKS = ("anls", "docvqa", "infovqa", "stvqa")


def score(task: str, pred: str, ref: str | Sequence[str]) -> float:
    """Score one prediction in [0, 1]: grounding by IoU >= 0.5, VQA-style tasks by VQA accuracy, document tasks by
    ANLS, everything else by normalised exact match against the (or any) reference."""
    if task == "grounding":
        return float(any(grounding_hit(pred, r) for r in _as_list(ref)))
    if task in VQA_TASKS:
        return vqa_accuracy(pred, _as_list(ref))
    if task in ANLS_TASKS:
        return anls(pred, ref)
    return float(exact_match(pred, ref))


def aggregate(results: Iterable[tuple[str, float]]) -> dict[str, dict[str, float]]:
    """Per-task {'n', 'score'} (mean), plus 'all': samples n, micro mean 'score' and macro mean over tasks."""
    sums: dict[str, list[float]] = {}
    for task, value in results:
        sums.setdefault(task, []).append(float(value))
    table: dict[str, dict[str, float]] = {t: {"n": len(v), "score": sum(v) / len(v)} for t, v in sorted(sums.items())}
    n = sum(len(v) for v in sums.values())
    table["all"] = {"n": n, "score": sum(map(sum, sums.values())) / n if n else 0.0,
                    "macro": sum(t["score"] for t in table.values()) / len(sums) if sums else 0.0}
    return table
