"""The embedded task suite: generated deterministically, no download, same format as commonsense_170k.

Six task types, one per answer style of the commonsense and math suites (true/false, answer1-5,
option1/2, ending1-4, solution1/2, numeric). Each needs a little arithmetic, ordering or counting
that a 135M model does near chance before tuning but can learn from a few hundred examples.
"""
from __future__ import annotations

import random
from typing import Any

from .records import Splits

WORDS = (
    "apple anchor basket bridge candle castle dinner dragon engine falcon forest garden glove harbor "
    "island jacket kettle ladder lemon marble meadow mirror needle orange palace pencil pepper planet "
    "pocket rabbit ribbon river rocket saddle silver spider spoon summer tablet tiger timber tomato "
    "tunnel valley velvet wagon walnut window winter yellow zebra button cactus donkey feather guitar "
    "hammer insect jungle kitten lizard magnet napkin oyster parrot puzzle quartz radish salmon tennis "
    "turtle umbrella violin wallet yogurt blossom cement dolphin eagle fabric goblet helmet iceberg "
    "jigsaw kernel lantern mango nectar onion pillow quiver raisin sailor thunder uncle vessel whistle"
).split()
VOWELS = set("aeiou")


def _fmt(choices, prefix):
    return " ".join(f"{prefix.capitalize()}{i + 1}: {c}" for i, c in enumerate(choices))


def _answer_format(prefix, n):
    return "Answer format: " + "/".join(f"{prefix}{i + 1}" for i in range(n))


def arith_check(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    truth = rng.random() < 0.5
    shown = a + b if truth else a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    instr = f"Is the following equation correct? {a} + {b} = {shown}\n\nAnswer format: true/false"
    return instr, "true" if truth else "false"


def largest(rng):
    nums = rng.sample(range(10, 100), 5)
    instr = (f"Which of the following numbers is the largest?\n\n{_fmt(nums, 'answer')}\n\n"
             f"{_answer_format('answer', 5)}")
    return instr, f"answer{nums.index(max(nums)) + 1}"


def alphabetical(rng):
    w = rng.sample(WORDS, 2)
    instr = (f"Which word comes first in alphabetical order?\n\n{_fmt(w, 'option')}\n\n"
             f"{_answer_format('option', 2)}")
    return instr, f"option{w.index(min(w)) + 1}"


def sequence(rng):
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    right = seq[-1] + step
    wrong = rng.sample([right + d for d in (-3, -2, -1, 1, 2, 3, step)], 3)
    endings = [right] + wrong
    rng.shuffle(endings)
    instr = (f"Which number continues the sequence {', '.join(map(str, seq))}?\n\n{_fmt(endings, 'ending')}\n\n"
             f"{_answer_format('ending', 4)}")
    return instr, f"ending{endings.index(right) + 1}"


def vowels(rng):
    word = "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou" + "rnst") for _ in range(rng.randint(3, 4)))
    n = sum(ch in VOWELS for ch in word)
    sols = [n, n + rng.choice([-1, 1]) if n > 1 else n + 1]
    rng.shuffle(sols)
    instr = (f"Goal: count the vowels in the word '{word}'.\n\n{_fmt(sols, 'solution')}\n\n"
             f"{_answer_format('solution', 2)}")
    return instr, f"solution{sols.index(n) + 1}"


def addition(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Answer with a number.", str(a + b)


TASKS = {f.__name__: f for f in (arith_check, largest, alphabetical, sequence, vowels, addition)}


class BundledSuite:
    """Train/val/test splits; test items never appear in train (distinct instructions)."""

    def __init__(self, n_train_per_task: int = 400, n_val_per_task: int = 8, n_test_per_task: int = 20,
                 tasks: list[str] | None = None, seed: int = 1234, name: str = "bundled"):
        self.n = (n_train_per_task, n_val_per_task, n_test_per_task)
        self.tasks = list(tasks or TASKS)  # names checked by the config schema (data.tasks)
        self.seed = seed

    def load(self) -> Splits:
        out: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        for ti, task in enumerate(self.tasks):
            rng = random.Random(self.seed * 1000 + ti)
            seen: set[str] = set()
            items: list[dict[str, Any]] = []
            want = sum(self.n)
            for _ in range(want * 50):
                if len(items) == want:
                    break
                instr, ans = TASKS[task](rng)
                if instr not in seen:
                    seen.add(instr)
                    items.append({"instruction": instr, "input": "", "output": f"the correct answer is {ans}",
                                  "answer": ans, "task": task})
            if len(items) < want:
                raise RuntimeError(f"bundled task {task} yields only {len(items)} distinct items, {want} asked")
            n_tr, n_va, _ = self.n
            out["train"] += items[:n_tr]
            out["val"] += items[n_tr:n_tr + n_va]
            out["test"] += items[n_tr + n_va:]
        random.Random(self.seed).shuffle(out["train"])
        return Splits(**out)
