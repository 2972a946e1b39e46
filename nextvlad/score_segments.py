"""``nextvlad score-segments``: mAP@K of a 2019 segment submission against rated records.

The clean form of Google's ``segment_eval_inference.py`` (SPEC_SEGMENTS 5), without its crashes
and Python 3 bugs (SPEC_SEGMENTS 7.1-7.4): the header line is skipped, ids are stripped (the last
id of a line counts), segment ids are plain strings ``"<video id>:<start>"``, a segment listed
twice in a line counts once, a listed class without rated positives is reported and skipped, any
number of classes may be listed. What stays as Google does it:

* ratings: ``(segment id, class) -> score`` with a later duplicate overwriting an earlier one;
  score > 0 is positive; every rating counts as it is stored (only a class outside
  ``--num-classes`` or parallel lists of different lengths make a bad record), so P_c counts
  every rated positive of class c, also those no submission can list (starts past the video's
  frames, past 295 or not a multiple of 5) and scores above 1;
* with ``--top-n`` N > 0 only the first N (distinct) ids of a line are kept, *before* unrated ids
  are dropped; then the unrated ids are dropped and the rest keep their file order;
* ``AP_c = (1/P_c) * sum over kept positions i with a positive of (positives in 1..i) / i``;
* the mean runs over the listed classes (``--mean-over submitted``, Google's) or over every
  whitelisted class with a rated positive, an unlisted one counting 0 (``--mean-over whitelist``).

A class listed on two lines, a line that is not ``<class>,<ids>`` or a blank line is an error
naming the file and line. The ratings are read first, so that of the submission only the rated
ids' scores are kept (memory bounded by the ratings and one line, not by the submission's size).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np

from nextvlad.data.parsing import _context_id, parse_sequence_example
from nextvlad.data.iterate import parse_records
from nextvlad.data.records import DataError
from nextvlad.data.segments import rating_lists
from nextvlad.segments import read_class_whitelist

logger = logging.getLogger("nextvlad.score_segments")

HEADERS = ("Class,Segments", "Class Id,Segment Ids")  # what inference.py writes / its README says


@dataclass
class Ratings:
    """Rated (segment id, class) entries of the records, and the rated positives per class."""

    scores: dict[tuple[str, int], float]
    positives: dict[int, int]
    skipped_records: int = 0


def read_ratings(pattern: str | Sequence[str], num_classes: int = 3862,
                 on_error: str = "raise") -> Ratings:
    """Every segment rating of the records (SPEC_SEGMENTS 5.1), through the CRC-checked reader.

    With ``on_error="skip"`` a bad record is skipped and counted, and so is the rest of a file
    that cannot be read further (empty, truncated or badly framed: nothing after it can be
    located), as the training reader does.
    """
    scores: dict[tuple[str, int], float] = {}
    skips: list[DataError] = []
    for record_scores in parse_records(pattern, partial(_record_ratings, num_classes=num_classes), on_error,
                                       on_skip=skips.append):
        scores.update(record_scores)
    positives: dict[int, int] = defaultdict(int)
    for (_, class_id), score in scores.items():
        if score > 0:
            positives[class_id] += 1
    return Ratings(scores, dict(positives), len(skips))


def _record_ratings(data: bytes, path: str, index: int, num_classes: int) -> dict[tuple[str, int], float]:
    """``{(segment id, class): score}`` of one record, a later entry overwriting an earlier one.

    Every entry counts as it is stored, as in Google's ``read_labels`` (SPEC_SEGMENTS 5.1): a start
    past the video or past 295 and a score outside [0, 1] are scored (score > 0: positive), not
    checked as the training reader checks them; only a class out of range or parallel lists of
    different lengths make the record bad.
    """
    message = parse_sequence_example(data, path, index)
    video_id = _context_id(message.context, path, index)
    classes, starts, scores = rating_lists(message.context, num_classes, path, index)
    return {(f"{video_id}:{start}", class_id): score
            for class_id, start, score in zip(classes.tolist(), starts.tolist(), scores.tolist())}


def read_submission(path: str | Path, ratings: Ratings, top_n: int = 0
                    ) -> tuple[dict[int, list[float]], int]:
    """``{class: rated scores of its listed ids, in file order}`` of a ``Class,Segments`` file,
    and the number of repeated ids dropped.

    Of each line only the first `top_n` distinct ids (all with 0) are looked at, and of those only
    the rated ones are kept, as their scores: the ranking of the metric (SPEC_SEGMENTS 5.2-5.3)
    needs nothing else, and a full submission's tens of millions of ids are never held at once.
    """
    path = Path(path)
    lines: dict[int, list[float]] = {}
    line_of: dict[int, int] = {}
    repeats = 0
    # utf-8-sig: a file saved with a byte-order mark still has its header recognised
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for line_number, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if line_number == 1 and text.strip() in HEADERS:
                continue
            class_text, comma, ids_text = text.partition(",")
            if not comma:
                raise ValueError(f"{path}, line {line_number}: expected '<class>,<segment ids>', got "
                                 f"{text[:60]!r}" + (" (a blank line)" if not text.strip() else ""))
            try:
                class_id = int(class_text)
            except ValueError:
                raise ValueError(f"{path}, line {line_number}: class {class_text!r} is not an integer") from None
            if class_id in lines:
                raise ValueError(f"{path}, line {line_number}: class {class_id} is listed again "
                                 f"(first on line {line_of[class_id]})")
            listed = ids_text.split()
            distinct = dict.fromkeys(listed)
            repeats += len(listed) - len(distinct)
            kept = islice(distinct, top_n) if top_n > 0 else distinct
            lines[class_id] = [score for segment in kept
                               if (score := ratings.scores.get((segment, class_id))) is not None]
            line_of[class_id] = line_number
    return lines, repeats


def average_precision(rated_scores: Sequence[float], num_positives: int) -> float:
    """``(1/P) * sum_{i: y_i > 0} (positives in 1..i) / i`` in float64, over the list's order."""
    hits = np.asarray(rated_scores, np.float64) > 0
    if num_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    ranks = np.arange(1, len(hits) + 1, dtype=np.float64)
    return float((np.cumsum(hits)[hits] / ranks[hits]).sum() / num_positives)


def score_submission(submission: dict[int, list[float]], ratings: Ratings,
                     mean_over: str = "submitted", whitelist: Sequence[int] | None = None
                     ) -> tuple[float, dict[int, float], list[int]]:
    """(mAP, per-class AP, listed classes skipped for having no rated positive) of what
    `read_submission` keeps."""
    per_class: dict[int, float] = {}
    no_positives = []
    for class_id in sorted(submission):
        positives = ratings.positives.get(class_id, 0)
        if not positives:
            no_positives.append(class_id)
            continue
        per_class[class_id] = average_precision(submission[class_id], positives)
    if mean_over == "whitelist":
        if whitelist is None:
            raise ValueError("--mean-over whitelist needs --whitelist")
        per_class = {c: per_class.get(c, 0.0) for c in sorted(whitelist) if ratings.positives.get(c, 0)}
    elif mean_over != "submitted":
        raise ValueError(f"mean_over must be 'submitted' or 'whitelist', got {mean_over!r}")
    mean = float(np.mean(list(per_class.values()))) if per_class else 0.0
    return mean, per_class, no_positives


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="nextvlad score-segments", description=__doc__.split("\n\n")[0])
    parser.add_argument("--submission", required=True, help="a Class,Segments CSV")
    parser.add_argument("--data", required=True, help="segment-rated TFRecords (glob, comma-separated)")
    parser.add_argument("--top-n", type=int, default=100_000,
                        help="keep the first N ids of each line (0: all); Kaggle's K of mAP@K")
    parser.add_argument("--mean-over", choices=("submitted", "whitelist"), default="submitted",
                        help="average over the listed classes (Google's script) or over every "
                             "whitelisted class with a rated positive")
    parser.add_argument("--whitelist", help="segment_label_ids.csv (needed for --mean-over whitelist)")
    parser.add_argument("--num-classes", type=int, default=3862)
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="a bad record stops with an error naming it, or is skipped and counted")
    parser.add_argument("--output", help="also write {'map': ..., 'per_class': {...}} to this JSON file")
    args = parser.parse_args(argv)
    if args.top_n < 0:
        parser.error(f"--top-n must be >= 0, got {args.top_n}")
    if args.mean_over == "whitelist" and not args.whitelist:
        parser.error("--mean-over whitelist needs --whitelist")
    whitelist = read_class_whitelist(args.whitelist, args.num_classes).tolist() if args.whitelist else None
    ratings = read_ratings(args.data, args.num_classes, args.on_error)
    submission, repeats = read_submission(args.submission, ratings, args.top_n)
    mean, per_class, no_positives = score_submission(submission, ratings, args.mean_over, whitelist)
    if ratings.skipped_records:
        print(f"skipped {ratings.skipped_records} bad records (--on-error skip; the unreadable rest of "
              "a file counts as one)", file=sys.stderr)
    if repeats:
        print(f"{repeats} repeated segment ids within lines counted once", file=sys.stderr)
    if no_positives:
        print(f"{len(no_positives)} listed classes have no rated positive and are not scored: "
              f"{no_positives[:20]}", file=sys.stderr)
    if not per_class:  # a mean over no class is no score: 0.0 would read as a (very bad) result
        if args.mean_over == "submitted" and not submission:
            raise ValueError(f"--submission {args.submission} lists no class: nothing to score")
        if not ratings.scores:
            reason = "has no rated segment (segment_labels / segment_scores): nothing to score"
        else:
            reason = (f"has no rated positive of any {'whitelisted' if args.mean_over == 'whitelist' else 'listed'} "
                      "class: no class can be scored")
        raise ValueError(f"--data {args.data} {reason}")
    print(f"mAP@{args.top_n or 'all'} over {len(per_class)} classes ({args.mean_over}): {mean:.6f}",
          file=sys.stderr)
    print(f"{mean:.6f}")
    if args.output:
        Path(args.output).write_text(json.dumps(
            {"map": mean, "per_class": {str(c): ap for c, ap in per_class.items()}}, indent=1) + "\n")
    return mean
