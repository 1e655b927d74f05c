"""First-match answer extraction of the LLM-Adapters / DoRA generative protocol.

The answer is the first label of the task's label family found in the response (case-insensitive,
whole word); numeric answers take the last number, as LLM-Adapters' math evaluation does.
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


def family_of(answer: str) -> str:
    """The label family a gold answer belongs to (numeric when it is a number)."""
    a = answer.strip().lower()
    for fam, pat in FAMILIES.items():
        if re.fullmatch(pat, a):
            return fam
    if _NUMBER.fullmatch(a):
        return "numeric"
    raise ValueError(f"answer {answer!r} matches no label family ({', '.join(FAMILIES)}, numeric)")


def extract(response: str, family: str) -> str | None:
    if family == "numeric":
        nums = _NUMBER.findall(response)
        return nums[-1].replace(",", "") if nums else None
    m = re.search(rf"\b({FAMILIES[family]})\b", response, flags=re.IGNORECASE)
    return m.group(1).lower() if m else None


def is_correct(response: str, answer: str) -> bool:
    fam = family_of(answer)
    pred = extract(response, fam)
    if pred is None:
        return False
    if fam == "numeric":
        return abs(float(pred) - float(answer.replace(",", ""))) < 1e-6
    return pred == answer.strip().lower()
