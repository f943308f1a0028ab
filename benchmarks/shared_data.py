"""The Bitext customer-support sample as a temporary distill recipe (the data stays in ../shared/data).

``prepare(root, n_items, n_seeds_per_class, seed)`` copies benchmarks/recipes/cs_category* into ``root`` and
writes inputs.jsonl (``n_items`` messages, stratified over the 11 categories, gold labels attached) and
few_shot.jsonl (``n_seeds_per_class`` labelled seeds per category, disjoint from the inputs).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DISTILL_BITEXT_CSV") or REPO.parent / "shared" / "data" / "bitext_customer_support"
            / "Bitext_Sample_Customer_Support_Training_Dataset.csv")
RECIPES = Path(__file__).resolve().parent / "recipes"


def load_rows(path: Path = DATA) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"the Bitext sample is not at {path}; it is read from ../shared/data (see SOURCE.md there) "
                         f"or from the file named by DISTILL_BITEXT_CSV")
    with path.open(newline="", encoding="utf-8") as fh:
        return [{"text": r["instruction"].strip(), "category": r["category"], "intent": r["intent"]}
                for r in csv.DictReader(fh)]


SEED_POOL_PER_CLASS = 10  # carved out before the inputs, so inputs are the same whatever few-shot size is asked


def prepare(root: Path, n_items: int, n_seeds_per_class: int = 1, seed: int = 0, n_test: int = 0) -> Path:
    """Write the recipe into ``root``; returns ``root`` (use it as recipe_dir).

    With ``n_test``, the first ``n_test`` inputs carry split=test (a fixed test set, ``recipe.split_field``) and the
    rest train, with every tenth in val; ``generate.limit=n_test + n`` then labels a training budget of ``n``."""
    if not 0 <= n_seeds_per_class <= SEED_POOL_PER_CLASS:
        raise ValueError(f"n_seeds_per_class must be 0..{SEED_POOL_PER_CLASS}")
    rows = load_rows()
    rng = random.Random(seed)
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_class[r["category"]].append(r)
    for items in by_class.values():
        rng.shuffle(items)
    classes = sorted(by_class)
    seeds = [r for c in classes for r in by_class[c][:n_seeds_per_class]]
    pool = {c: by_class[c][SEED_POOL_PER_CLASS:] for c in classes}
    inputs, i = [], 0
    seen = {r["text"].lower() for c in classes for r in by_class[c][:SEED_POOL_PER_CLASS]}
    while len(inputs) < n_items:  # round-robin over classes: stratified, as balanced as the data allows
        c = classes[i % len(classes)]
        i += 1
        while pool[c]:
            r = pool[c].pop()
            if r["text"].lower() not in seen:
                seen.add(r["text"].lower())
                inputs.append(r)
                break
    rng.shuffle(seeds)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(RECIPES / "cs_category.yaml", root / "cs_category.yaml")
    shutil.copytree(RECIPES / "cs_category", root / "cs_category", dirs_exist_ok=True)
    with (root / "cs_category" / "inputs.jsonl").open("w") as fh:
        for k, r in enumerate(inputs):
            row = {"id": f"b{k}", "text": r["text"], "gold": {"category": r["category"]}}
            if n_test:
                row["split"] = "test" if k < n_test else ("val" if (k - n_test) % 10 == 9 else "train")
            fh.write(json.dumps(row) + "\n")
    if n_test:
        with (root / "cs_category.yaml").open("a") as fh:
            fh.write("split_field: split\n")
    with (root / "cs_category" / "few_shot.jsonl").open("w") as fh:
        for r in seeds:
            fh.write(json.dumps({"text": r["text"], "label": {"category": r["category"]}}) + "\n")
    return root
