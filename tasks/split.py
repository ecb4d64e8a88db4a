"""split: assign each clean row to train/val/test by a salted hash of its text; check for leakage.

A row's split depends only on its own text and `split.salt`, so it keeps its split when the data
grows, and old and new models can be compared on the same test rows. Near-duplicate texts
(character 5-gram Jaccard >= `split.near_duplicate_threshold`) would leak across splits, so they
are grouped and each group follows the split of one canonical member (its lexicographically
smallest text). Candidates come from MinHash + LSH banding, every candidate pair is then checked
exactly, so the cost stays near-linear in rows. A final check on the written splits fails loudly,
naming row ids, if identical or near-identical texts still sit in different splits.

Outputs: `artifacts/split/{train,val,test}.jsonl` (sorted by id) and `metrics/split.json` with sizes
and a sha256 per split file.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.core.config import SplitConfig
from tasks.core.errors import DataError, StageError
from tasks.core.io import file_sha256, iter_jsonl, write_json, write_jsonl
from tasks.core.layout import SPLITS
from tasks.core.stage_params import StageParams, stage_entry

logger = logging.getLogger(__name__)

STAGE = "split"
NGRAM = 5
NUM_PERMUTATIONS = 64
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
EXAMPLES = 5


def split_fraction(text: str, salt: str) -> float:
    """Position of a text in [0, 1): the first 8 bytes of sha256(salt, text), uniform and stable."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, cfg: SplitConfig) -> str:
    """The split a text belongs to on its own: train below `train`, then val, then test."""
    u = split_fraction(text, cfg.salt)
    if u < cfg.train:
        return "train"
    if u < cfg.train + cfg.val:
        return "val"
    return "test"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised: a fixed, well-mixed 64-bit hash (unlike Python's salted hash())."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """Sorted unique 64-bit hashes of the character n-grams of `text` (lower-cased, spaces removed).

    A text shorter than n characters yields one gram: the whole text.
    """
    norm = "".join(text.lower().split())
    codes = np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.zeros(0, dtype=np.uint64)
    width = min(n, len(codes))
    h = np.zeros(len(codes) - width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):
            h = _splitmix64(h ^ codes[k : len(codes) - width + 1 + k])
    return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _bands(threshold: float) -> int:
    """Rows per LSH band: the largest that still misses a pair at `threshold` with probability < 1e-4."""
    for rows in (16, 8, 4, 2, 1):
        bands = NUM_PERMUTATIONS // rows
        if (1 - threshold**rows) ** bands < 1e-4:
            return rows
    return 1


def near_duplicate_pairs(texts: Sequence[str], threshold: float) -> list[tuple[int, int, float]]:
    """Index pairs (i < j) whose character 5-gram Jaccard similarity is >= threshold.

    MinHash signatures (64 permutations) are banded so that pairs at the threshold become
    candidates with probability > 0.9999; each candidate is then scored exactly, so no pair below
    the threshold is returned.

    Args:
        texts: the texts.
        threshold: the Jaccard similarity at which two texts count as near-identical.

    Returns:
        `(i, j, similarity)` for every near-identical pair found, sorted.
    """
    grams = [ngram_hashes(t) for t in texts]
    seeds = _splitmix64(np.arange(1, NUM_PERMUTATIONS + 1, dtype=np.uint64))
    signatures = np.empty((len(texts), NUM_PERMUTATIONS), dtype=np.uint64)
    for i, g in enumerate(grams):
        if len(g) == 0:
            signatures[i] = _MASK64
            continue
        signatures[i] = _splitmix64(g[None, :] ^ seeds[:, None]).min(axis=1)
    rows = _bands(threshold)
    candidates: set[tuple[int, int]] = set()
    for start in range(0, NUM_PERMUTATIONS, rows):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        band = np.ascontiguousarray(signatures[:, start : start + rows])
        for i in range(len(texts)):
            buckets[band[i].tobytes()].append(i)
        for members in buckets.values():
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    candidates.add((members[a], members[b]))
    pairs = []
    for i, j in sorted(candidates):
        sim = jaccard(grams[i], grams[j])
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs


def _groups(n: int, pairs: list[tuple[int, int, float]]) -> list[int]:
    """Union-find over pairs: the group root of each index."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(n)]


@dataclass
class Assignment:
    """Rows per split, plus how near-duplicate grouping changed it."""

    splits: dict[str, list[dict[str, str]]]
    groups: int  # near-duplicate groups of two or more rows
    grouped_rows: int  # rows in such groups
    moved: int  # rows whose split follows their group's canonical member instead of their own hash


def assign(rows: list[dict[str, str]], cfg: SplitConfig) -> Assignment:
    """Assign rows to splits by their text hash, near-duplicates together.

    Args:
        rows: `{"id", "text", "summary"}` dicts.
        cfg: ratios, salt and the near-duplicate threshold.

    Returns:
        The assignment; each split's rows sorted by id.
    """
    texts = [r["text"] for r in rows]
    pairs = near_duplicate_pairs(texts, cfg.near_duplicate_threshold)
    roots = _groups(len(rows), pairs)
    members: dict[int, list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        members[root].append(i)
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    moved = 0
    for group in members.values():
        # A canonical member that does not depend on row order or salt: the smallest text.
        canonical = min(group, key=lambda i: texts[i])
        target = split_of(texts[canonical], cfg)
        for i in group:
            moved += split_of(texts[i], cfg) != target
            splits[target].append(rows[i])
    for name in SPLITS:
        splits[name].sort(key=lambda r: r["id"])
    big = [g for g in members.values() if len(g) > 1]
    return Assignment(splits=splits, groups=len(big), grouped_rows=sum(map(len, big)), moved=moved)


def find_leaks(splits: dict[str, list[dict[str, str]]], threshold: float) -> list[str]:
    """Identical or near-identical texts that sit in different splits, one line per pair.

    Args:
        splits: split name -> rows.
        threshold: character 5-gram Jaccard similarity from which two texts are near-identical.

    Returns:
        Lines like `train:id1 ~ test:id2 (jaccard 0.93)`; empty when there is no leak.
    """
    flat = [(name, r) for name in SPLITS for r in splits.get(name, [])]
    leaks = []
    for i, j, sim in near_duplicate_pairs([r["text"] for _, r in flat], threshold):
        (sa, ra), (sb, rb) = flat[i], flat[j]
        if sa != sb:
            kind = "identical text" if ra["text"] == rb["text"] else f"jaccard {sim:.2f}"
            leaks.append(f"{sa}:{ra['id']} ~ {sb}:{rb['id']} ({kind})")
    return leaks


@stage_entry("split")
def run(params: StageParams) -> dict[str, Any]:
    """Split `artifacts/validate/clean.jsonl` into train/val/test.

    Args:
        params: the stage's slice: `split`.

    Returns:
        The metrics written to `metrics/split.json`.

    Raises:
        StageError: there is no clean data (validate has not run or failed) or a leak is found.
        DataError: ids repeat, or a split would be empty.
    """
    cfg, layout = params.split, params.layout
    # Old splits must not outlive a failed run and pass for this data's splits.
    for name in SPLITS:
        layout.split(name).unlink(missing_ok=True)
    source = layout.stage_dir("validate") / "clean.jsonl"
    if not source.exists():
        raise StageError(f"{source} does not exist: run `sftflow validate` first (it writes it only when the data passes)")
    rows = list(iter_jsonl(source))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeats = sorted({i for i in ids if i in seen or seen.add(i)})
        raise DataError(f"{source}: ids repeat ({', '.join(repeats[:EXAMPLES])}): every row needs its own id")

    result = assign(rows, cfg)
    empty = [name for name in SPLITS if not result.splits[name]]
    if empty:
        raise DataError(
            f"{len(rows)} rows leave split(s) {empty} empty with ratios train={cfg.train:g} val={cfg.val:g}"
            f" test={cfg.test:g}: add rows or raise those ratios"
        )
    leaks = find_leaks(result.splits, cfg.near_duplicate_threshold)
    if leaks:
        raise StageError(
            f"{len(leaks)} near-identical text pair(s) across splits (threshold {cfg.near_duplicate_threshold:g}): "
            + "; ".join(leaks[:EXAMPLES])
        )

    metrics: dict[str, Any] = {"rows": len(rows)}
    for name in SPLITS:
        write_jsonl(layout.split(name), result.splits[name])
        metrics[f"{name}_rows"] = len(result.splits[name])
    for name in SPLITS:
        metrics[f"{name}_share"] = round(len(result.splits[name]) / len(rows), 4)
    metrics.update(
        near_duplicate_groups=result.groups,
        near_duplicate_rows=result.grouped_rows,
        rows_moved_to_group_split=result.moved,
        sha256={name: file_sha256(layout.split(name)) for name in SPLITS},
    )
    write_json(layout.metrics_file(STAGE), metrics)
    logger.info(
        "split: %d rows -> train %d, val %d, test %d (%d near-duplicate groups, %d rows moved with their group)",
        len(rows),
        metrics["train_rows"],
        metrics["val_rows"],
        metrics["test_rows"],
        result.groups,
        result.moved,
    )
    return metrics
