"""split: assign each clean row to train/val/test by a salted hash of its text; keep it there; check for leakage.

A new row's split depends only on its own text and `split.salt`, so old and new models can be
compared on the same test rows. Near-duplicate texts (character 5-gram Jaccard >=
`split.near_duplicate_threshold`) would leak across splits, so they are grouped; a group of new
rows follows the split of one canonical member (its lexicographically smallest text). Candidates
come from MinHash + LSH banding, every candidate pair is then checked exactly, so the cost stays
near-linear in rows.

Once assigned, a row keeps its split forever: `artifacts/split/assignments.jsonl` remembers the
split of every text ever seen under the salt (keyed by the sha256 of the text, so a corrected
summary does not move its row), and the stage reads it back each run. A new near-duplicate joins
the split its group already has; one that bridges rows of different splits joins the group's
earliest assignment (the lowest `round`), is counted (`bridging_rows`), and the pairs it leaves
across splits are counted too (`near_duplicate_pairs_across_splits`) instead of failing the run.
A final check on the written splits fails loudly, naming row ids, if any other identical or
near-identical texts sit in different splits. No table is the first run; another salt starts the
table anew (logged); a corrupt table stops the stage, naming the file and the fix.

Outputs: `artifacts/split/{train,val,test}.jsonl` (sorted by id), `artifacts/split/assignments.jsonl`
(sorted by hash; a `persist` DVC output) and `metrics/split.json` with sizes and a sha256 per split file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

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
TABLE_FIELDS = ("text_sha256", "split", "salt", "round")
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


def text_sha256(text: str) -> str:
    """The key of a row in the assignment table: the hex sha256 of its text (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


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


@dataclass(frozen=True)
class Assigned:
    """A text's split as the assignment table remembers it, and the round (1, 2, ...) that first gave it."""

    split: str
    round: int


@dataclass
class Assignment:
    """Rows per split, the updated assignment table, and how grouping and earlier runs shaped them."""

    splits: dict[str, list[dict[str, str]]]
    table: dict[str, Assigned]  # every text ever assigned under this salt (this run's rows included), by text_sha256
    groups: int  # near-duplicate groups of two or more rows
    grouped_rows: int  # rows in such groups
    moved: int  # rows not in the split of their own hash: they follow their group (or its earlier assignment)
    kept: int  # rows whose split the table already held
    bridging: list[str]  # ids of new rows whose group's earlier rows sit in more than one split
    crossings: set[frozenset[str]]  # id pairs of near-duplicates that earlier assignments keep in different splits


def assign(rows: list[dict[str, str]], cfg: SplitConfig, earlier: Mapping[str, Assigned] | None = None) -> Assignment:
    """Assign rows to splits: a remembered row keeps its split, new rows join their group's or go by hash.

    Args:
        rows: `{"id", "text", "summary"}` dicts.
        cfg: ratios, salt and the near-duplicate threshold.
        earlier: the assignment table so far (`read_assignments`), by `text_sha256`; none on a first run.

    Returns:
        The assignment; each split's rows sorted by id. Its `table` is `earlier` plus this run's new
        texts, each with the next round.
    """
    earlier = earlier or {}
    texts = [r["text"] for r in rows]
    keys = [text_sha256(t) for t in texts]
    pairs = near_duplicate_pairs(texts, cfg.near_duplicate_threshold)
    roots = _groups(len(rows), pairs)
    members: dict[int, list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        members[root].append(i)
    this_round = max((a.round for a in earlier.values()), default=0) + 1
    table = dict(earlier)
    where = [""] * len(rows)
    bridging: list[str] = []
    for group in members.values():
        known = [i for i in group if keys[i] in earlier]
        if known:
            # The group's earliest assignment wins; within a round, the smallest text (as for a new group).
            first = min(known, key=lambda i: (earlier[keys[i]].round, texts[i]))
            target = earlier[keys[first]].split
            spread = len({earlier[keys[i]].split for i in known}) > 1
        else:
            # A canonical member that does not depend on row order or salt: the smallest text.
            target = split_of(texts[min(group, key=texts.__getitem__)], cfg)
            spread = False
        for i in group:
            if keys[i] in earlier:
                where[i] = earlier[keys[i]].split
                continue
            where[i] = target
            table[keys[i]] = Assigned(target, this_round)
            if spread:
                bridging.append(rows[i]["id"])
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for i, row in enumerate(rows):
        splits[where[i]].append(row)
    for name in SPLITS:
        splits[name].sort(key=lambda r: r["id"])
    big = [g for g in members.values() if len(g) > 1]
    return Assignment(
        splits=splits,
        table=table,
        groups=len(big),
        grouped_rows=sum(map(len, big)),
        moved=sum(where[i] != split_of(t, cfg) for i, t in enumerate(texts)),
        kept=sum(k in earlier for k in keys),
        bridging=sorted(bridging),
        crossings={frozenset((rows[i]["id"], rows[j]["id"])) for i, j, _ in pairs if where[i] != where[j]},
    )


def _table_fix(path: Path) -> str:
    return (
        f"restore it from DVC (`dvc checkout {path}`, or `dvc pull` for the dvc.lock you are on); deleting it "
        "reassigns every row by its hash alone, so rows that followed a near-duplicate group can change split"
    )


def read_assignments(path: Path, salt: str) -> dict[str, Assigned]:
    """The assignment table at `path`, by `text_sha256`; empty when there is none yet or its salt is another.

    Args:
        path: the table (`Layout.split_assignments`).
        salt: `split.salt` of this run. A table made with another salt is dropped on purpose (logged):
            the new salt reassigns every row.

    Returns:
        The remembered split and round of every text.

    Raises:
        DataError: the table is corrupt: a line that is not JSON or lacks/adds fields, a bad hash,
            split, salt or round, a repeated hash, or records with different salts. Every problem found
            is named (up to a few), with the fix.
    """
    if not path.exists():
        if _recorded_in_dvc_lock(path):
            raise DataError(
                f"{path} is missing, but dvc.lock records it from an earlier split: restore it with "
                f"`dvc checkout {path}` or `dvc pull` (assigning the rows afresh could move rows between splits)"
            )
        logger.warning(
            "split: no assignment table at %s: assigning every row by its hash (a first run). If this project "
            "has run before, stop and `dvc pull` it: without it rows that followed a near-duplicate can change split",
            path,
        )
        return {}
    problems: list[str] = []
    table: dict[str, Assigned] = {}
    salts: dict[str, int] = defaultdict(int)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is corrupt (not UTF-8: {e}): {_table_fix(path)}") from e
    if not lines:
        problems.append("it is empty (the stage never writes an empty table)")
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n} is not JSON ({e.msg})")
            continue
        if not isinstance(record, dict) or sorted(record) != sorted(TABLE_FIELDS):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            problems.append(f"line {n} has fields {got}, not {list(TABLE_FIELDS)}")
            continue
        key, split, record_salt, round_ = (record[f] for f in TABLE_FIELDS)
        bad = []
        if not isinstance(key, str) or not _HEX64.fullmatch(key):
            bad.append(f"text_sha256 {key!r} is not 64 lower-case hex digits")
        if split not in SPLITS:
            bad.append(f"split {split!r} is not one of {list(SPLITS)}")
        if not isinstance(record_salt, str):
            bad.append(f"salt {record_salt!r} is not a string")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 1:
            bad.append(f"round {round_!r} is not a positive integer")
        if bad:
            problems.append(f"line {n}: " + ", ".join(bad))
            continue
        if key in table:
            problems.append(f"line {n} repeats text_sha256 {key[:12]}…")
            continue
        salts[record_salt] += 1
        table[key] = Assigned(split, round_)
    if len(salts) > 1:
        counts = ", ".join(f"{s!r} on {c} line(s)" for s, c in sorted(salts.items()))
        problems.append(f"its records carry different salts ({counts}); one table holds one salt")
    if problems:
        more = f" (and {len(problems) - EXAMPLES} more)" if len(problems) > EXAMPLES else ""
        raise DataError(
            f"{path} is corrupt: " + "; ".join(problems[:EXAMPLES]) + more + f". It is the memory of every row's split: "
            + _table_fix(path)
        )
    (table_salt,) = salts
    if table_salt != salt:
        logger.warning(
            "split: split.salt is %r but %s was made with salt %r: the new salt reassigns every row by its hash and the "
            "table starts anew (%d remembered texts dropped)",
            salt,
            path,
            table_salt,
            len(table),
        )
        return {}
    return table


def write_assignments(path: Path, table: Mapping[str, Assigned], salt: str) -> None:
    """Write the assignment table atomically, sorted by hash (the same table gives the same bytes)."""
    write_jsonl(
        path,
        ({"text_sha256": key, "split": table[key].split, "salt": salt, "round": table[key].round} for key in sorted(table)),
    )


def find_leaks(
    splits: dict[str, list[dict[str, str]]], threshold: float, allowed: Collection[frozenset[str]] = ()
) -> list[str]:
    """Identical or near-identical texts that sit in different splits, one line per pair.

    Args:
        splits: split name -> rows.
        threshold: character 5-gram Jaccard similarity from which two texts are near-identical.
        allowed: id pairs that may cross (near-duplicates that earlier assignments keep apart, `Assignment.crossings`).

    Returns:
        Lines like `train:id1 ~ test:id2 (jaccard 0.93)`; empty when there is no leak.
    """
    flat = [(name, r) for name in SPLITS for r in splits.get(name, [])]
    leaks = []
    for i, j, sim in near_duplicate_pairs([r["text"] for _, r in flat], threshold):
        (sa, ra), (sb, rb) = flat[i], flat[j]
        if sa != sb and frozenset((ra["id"], rb["id"])) not in allowed:
            kind = "identical text" if ra["text"] == rb["text"] else f"jaccard {sim:.2f}"
            leaks.append(f"{sa}:{ra['id']} ~ {sb}:{rb['id']} ({kind})")
    return leaks


@stage_entry("split")
def run(params: StageParams) -> dict[str, Any]:
    """Split `artifacts/validate/clean.jsonl` into train/val/test, every remembered row in its remembered split.

    Args:
        params: the stage's slice: `split`.

    Returns:
        The metrics written to `metrics/split.json`.

    Raises:
        StageError: there is no clean data (validate has not run or failed) or a leak is found.
        DataError: ids repeat, a split would be empty, or the assignment table is corrupt.
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

    earlier = read_assignments(layout.split_assignments, cfg.salt)
    result = assign(rows, cfg, earlier)
    empty = [name for name in SPLITS if not result.splits[name]]
    if empty:
        raise DataError(
            f"{len(rows)} rows leave split(s) {empty} empty with ratios train={cfg.train:g} val={cfg.val:g}"
            f" test={cfg.test:g}: add rows or raise those ratios"
        )
    leaks = find_leaks(result.splits, cfg.near_duplicate_threshold, allowed=result.crossings)
    if leaks:
        raise StageError(
            f"{len(leaks)} near-identical text pair(s) across splits (threshold {cfg.near_duplicate_threshold:g}): "
            + "; ".join(leaks[:EXAMPLES])
        )
    if result.bridging:
        logger.warning(
            "split: %d new row(s) are near-duplicates of rows that earlier runs put in different splits; each joined "
            "its group's earliest assignment, leaving %d near-duplicate pair(s) across splits: %s",
            len(result.bridging),
            len(result.crossings),
            ", ".join(result.bridging[:EXAMPLES]),
        )

    metrics: dict[str, Any] = {"rows": len(rows)}
    for name in SPLITS:
        write_jsonl(layout.split(name), result.splits[name])
        metrics[f"{name}_rows"] = len(result.splits[name])
    write_assignments(layout.split_assignments, result.table, cfg.salt)
    for name in SPLITS:
        metrics[f"{name}_share"] = round(len(result.splits[name]) / len(rows), 4)
    metrics.update(
        near_duplicate_groups=result.groups,
        near_duplicate_rows=result.grouped_rows,
        rows_moved_to_group_split=result.moved,
        rows_kept_from_earlier_runs=result.kept,
        rows_newly_assigned=len(rows) - result.kept,
        bridging_rows=len(result.bridging),
        near_duplicate_pairs_across_splits=len(result.crossings),
        assignment_table_texts=len(result.table),
        sha256={name: file_sha256(layout.split(name)) for name in SPLITS},
    )
    write_json(layout.metrics_file(STAGE), metrics)
    logger.info(
        "split: %d rows -> train %d, val %d, test %d (%d kept from earlier runs, %d new; %d near-duplicate groups, "
        "%d rows moved with their group, %d bridging)",
        len(rows),
        metrics["train_rows"],
        metrics["val_rows"],
        metrics["test_rows"],
        result.kept,
        len(rows) - result.kept,
        result.groups,
        result.moved,
        len(result.bridging),
    )
    return metrics


def _recorded_in_dvc_lock(path: Path, lock_file: Path = Path("dvc.lock")) -> bool:
    """True when dvc.lock (in the project root, the cwd) lists `path` among the split stage's outputs."""
    if not lock_file.exists():
        return False
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    outs = ((lock.get("stages") or {}).get(STAGE) or {}).get("outs") or []
    return any(Path(o.get("path", "")) == Path(path) for o in outs if isinstance(o, dict))
