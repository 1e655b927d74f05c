"""First-match answer extraction of the LLM-Adapters / DoRA generative protocol.

The answer is the first label of the task's label family found in the response (case-insensitive,
whole word); numeric answers take the last number, as LLM-Adapters' math evaluation does; AQuA's
letter answers (A-E) take the first upper-case letter A-E standing as a word.
"""
from __future__ import annotations

import re

FAMILIES = {
    "true_false": r"true|false",
    "solution": r"solution[12]",
    "answer": r"answer[1-5]",
    "ending": r"ending[1-4]",
    "option": r"option[12]",
}
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_LETTER = re.compile(r"\b([A-E])\b")  # upper case only: the article "a" is not an answer


def family_of(answer: str) -> str:
    """The label family a gold answer belongs to (numeric when it is a number)."""
    a = answer.strip().lower()
    for fam, pat in FAMILIES.items():
        if re.fullmatch(pat, a):
            return fam
    if _NUMBER.fullmatch(a):
        return "numeric"
    if re.fullmatch(r"[A-E]", answer.strip()):
        return "letter"
    raise ValueError(f"answer {answer!r} matches no label family ({', '.join(FAMILIES)}, numeric, letter A-E)")


def extract(response: str, family: str) -> str | None:
    if family == "numeric":
        nums = _NUMBER.findall(response)
        return nums[-1].replace(",", "") if nums else None
    if family == "letter":
        m = _LETTER.search(response)
        return m.group(1).lower() if m else None
    m = re.search(rf"\b({FAMILIES[family]})\b", response, flags=re.IGNORECASE)
    return m.group(1).lower() if m else None


def matches(pred: str | None, answer: str) -> bool:
    """Whether an extracted label (or number) is the gold answer; numbers compare within 1e-6."""
    if pred is None or pred == "":
        return False
    if family_of(answer) == "numeric":
        try:
            return abs(float(pred.replace(",", "")) - float(answer.replace(",", ""))) < 1e-6
        except ValueError:
            return False
    return pred.strip().lower() == answer.strip().lower()


def is_correct(response: str, answer: str, family: str | None = None) -> bool:
    """First-match scoring of one response; the label family is the task's (default: the gold's)."""
    return matches(extract(response, family or family_of(answer)), answer)
