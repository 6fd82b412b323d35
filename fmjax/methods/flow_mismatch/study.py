"""Scoring-rule studies: every row of a grid of Flow Mismatching rules, scored from one
stored mismatch tensor in a few vectorised, jitted passes.

A rule is a `Settings`. Its num_paths K and num_times T pick a subset of the stored grid
(the first K paths; the T interior times j / (T + 1), a sub-grid of the stored T_max);
its other fields are the scoring rules. `rule_grid` builds the list from a base Settings
and value lists per field, so a new Settings field is a new axis of the grid.
`evaluate_rules` computes each row's image and pixel metrics:
  1. path aggregation (`aggregate_paths`) once per (K, aggregate), over all stored times,
     one sort per K shared by the order rules (min, rank, median, trimmed);
  2. the rest of the map (`map_from_per_time`) once per distinct map rule, rules that
     share a time subset and every other map field batched in one call;
  3. image scores (`image_score`) batched over all maps; pixel metrics once per distinct
     map (image-score rules do not change maps, and equal maps are shared);
  4. image metrics per row.
`serial_rows` computes the same rows one at a time with `heat_maps` and the metrics of
`fmjax.eval.metrics`: the reference the fast path is tested against.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.errors import ConfigError, ScoreRuleError
from fmjax.eval import metrics
from fmjax.methods.flow_mismatch.order import sort_axis
from fmjax.methods.flow_mismatch.scorer import aggregate_ordered, aggregate_times, heat_maps
from fmjax.methods.flow_mismatch.settings import NEUTRAL, Settings, validate
from fmjax.methods.maps import gaussian_smooth, image_score

__all__ = ["MAP_FIELDS", "STORED", "evaluate_rules", "map_from_per_time", "map_rule", "rule_fields", "rule_grid",
           "serial_rows", "time_grid", "time_index"]

STORED = ("seed", "use_ema")  # fixed by the stored tensor (its noise draw and parameters)
SUBSET = ("num_paths", "num_times")
PATH_FIELDS = ("aggregate",)  # step 1
MAP_FIELDS = ("time_weight", "smooth_sigma")  # step 2: `map_from_per_time`
IMAGE_FIELDS = ("image_score",)


def rule_fields() -> tuple:
    """The Settings fields a rule may vary (all but the neutral and the stored ones)."""
    return tuple(f.name for f in dataclasses.fields(Settings) if f.name not in NEUTRAL + STORED)


def _unknown_fields(rule) -> list:
    """Fields of `rule` that differ from the Settings default but that no step knows."""
    known = SUBSET + PATH_FIELDS + MAP_FIELDS + IMAGE_FIELDS + NEUTRAL + STORED
    default = Settings()
    return [f.name for f in dataclasses.fields(Settings)
            if f.name not in known and getattr(rule, f.name) != getattr(default, f.name)]


def _check(rule) -> None:
    class _Config:  # validate() reads config.score
        score = rule

    validate(_Config)
    unknown = _unknown_fields(rule)
    if unknown:
        raise ScoreRuleError(f"the study does not know how {', '.join(unknown)} change the map: "
                             f"add it to study.map_from_per_time and MAP_FIELDS")


def rule_grid(base: Settings = Settings(), **axes) -> list:
    """Every combination of the values in `axes` (Settings field -> list of values) applied
    to `base`, as a list of Settings in itertools.product order. Combinations that only a
    smaller K makes invalid (rank:r with r > K) are left out; any other invalid value raises
    ScoreRuleError. `base` fixes every field not in `axes` (seed and use_ema must be the
    stored tensor's)."""
    names = list(axes)
    bad = [n for n in names if n not in rule_fields()]
    if bad:
        raise ScoreRuleError(f"not a rule field: {', '.join(bad)} (rule fields: {', '.join(rule_fields())})")
    most_paths = max(axes.get("num_paths", [base.num_paths]))
    rules = []
    for values in itertools.product(*(list(v) for v in axes.values())):
        rule = dataclasses.replace(base, **dict(zip(names, values)))
        try:
            _check(rule)
        except (ScoreRuleError, ConfigError):
            _check(dataclasses.replace(rule, num_paths=most_paths))  # raises unless K was the cause
            continue
        rules.append(rule)
    return rules


def map_rule(rule: Settings) -> Settings:
    """The part of `rule` that decides its map: image score and neutral fields reset."""
    default = Settings()
    return dataclasses.replace(rule, **{n: getattr(default, n) for n in IMAGE_FIELDS + NEUTRAL})


def time_grid(t_values) -> tuple:
    """(T_max, {T: indices into T_max's times}): the smallest stored grid holding every T
    in t_values as a sub-grid (T_max + 1 = lcm of the T + 1)."""
    t_max = math.lcm(*[int(t) + 1 for t in t_values]) - 1
    return t_max, {int(t): time_index(t, t_max) for t in t_values}


def time_index(num_times: int, t_max: int) -> np.ndarray:
    """Indices int [T] of the times j / (T + 1) among the T_max stored ones."""
    if num_times < 1 or (t_max + 1) % (num_times + 1):
        raise ScoreRuleError(f"T = {num_times} is not a sub-grid of the stored T = {t_max} "
                             f"(T + 1 must divide {t_max + 1})")
    return np.array([j * (t_max + 1) // (num_times + 1) - 1 for j in range(1, num_times + 1)], np.int64)


def map_from_per_time(per_time, times, rule: Settings):
    """A rule's map from its per-time path aggregates: per_time [..., T, H, W] (leading
    axes batched), times [T] -> [..., H, W]. What `heat_maps` does after
    `aggregate_paths`: time weights, then smoothing. A new map rule adds its field to
    MAP_FIELDS and its step here (the tests hold this to `heat_maps`)."""
    maps = aggregate_times(per_time, times, rule.time_weight)
    flat = maps.reshape((-1,) + maps.shape[-2:])
    return gaussian_smooth(flat, rule.smooth_sigma).reshape(maps.shape)


@functools.lru_cache(maxsize=16)
def _maps_program(rules: tuple, t_max: int):
    """(jitted (delta [C, T_max, K_max, H, W], times [T_max]) -> maps [R, C, H, W], the map
    rules of its R rows): the distinct map rules `rules`, reordered so that rules sharing
    every field but K and the aggregate are one batched call. Cached: a study of another
    test set of the same shape reuses the compiled program."""
    indices = {r.num_times: time_index(r.num_times, t_max) for r in rules}
    path_keys = sorted({(r.num_paths, r.aggregate) for r in rules})
    row = {key: i for i, key in enumerate(path_keys)}
    groups = {}
    for r in rules:
        groups.setdefault(dataclasses.replace(r, num_paths=1, aggregate="min"), []).append(r)
    for members in groups.values():
        members.sort(key=lambda r: row[(r.num_paths, r.aggregate)])

    def run(delta, times):
        ordered = {k: sort_axis(delta[:, :, :k], 2) for k in {k for k, agg in path_keys if agg != "mean"}}
        per_time = jnp.stack([aggregate_ordered(delta[:, :, :k], ordered.get(k), agg, axis=2) for k, agg in path_keys])
        out = []
        for key, members in groups.items():
            index = indices[key.num_times]
            step = index[0] + 1  # the sub-grid's times are every step-th stored one
            rows = [row[(r.num_paths, r.aggregate)] for r in members]
            stack = per_time if rows == list(range(len(path_keys))) else per_time[np.asarray(rows)]
            out.append(map_from_per_time(stack[:, :, index[0]::step], times[index[0]::step], key))
        return jnp.concatenate(out)

    return jax.jit(run), [r for members in groups.values() for r in members]


@functools.lru_cache(maxsize=16)
def _scores_program(specs: tuple):
    """Jitted maps [B, H, W] -> image scores [len(specs), B]."""
    return jax.jit(lambda maps: jnp.stack([image_score(maps, s) for s in specs]))


def _fingerprint(array: np.ndarray) -> bytes:
    return array.reshape(-1)[:: max(1, array.size // 512)].tobytes()


def evaluate_rules(delta, times, rules, labels, masks=None, image_chunk: int = 0,
                   max_bytes: int = 2 ** 30, threads: int = 2) -> list:
    """One row per rule: {rule field: value, ...} (the fields of `rule_fields`) with
    image_auroc, image_ap, image_f1_max and, given masks with anomalous pixels,
    pixel_auroc, pixel_ap, pixel_f1_max, aupro (else nan), as `fmjax.eval.metrics`
    computes them for the maps and scores of `serial_rows`.

    delta: the stored mismatch [N, T_max, K_max, H, W] (numpy or memmap, any float dtype);
    times: its interior times [T_max]; rules: Settings (e.g. from `rule_grid`);
    labels: {0, 1} [N]; masks: {0, 1} [N, H, W] or None. Images go through the jitted
    map pass `image_chunk` at a time (0: as many as `max_bytes` holds; the last chunk
    padded: one program); the distinct maps are held in groups of at most `max_bytes`
    (one program per group); pixel metrics run on `threads` threads.
    """
    times = np.asarray(times, np.float32)
    n, t_max, k_max = delta.shape[:3]
    rules = list(rules)
    for rule in rules:
        _check(rule)
        if rule.num_paths > k_max:
            raise ScoreRuleError(f"K = {rule.num_paths} exceeds the stored K = {k_max}")
    for num_times in sorted({r.num_times for r in rules}):
        time_index(num_times, t_max)  # raises unless T is a sub-grid of the stored times
    distinct = list(dict.fromkeys(map_rule(r) for r in rules))
    specs = list(dict.fromkeys(r.image_score for r in rules))
    labels = np.asarray(labels)
    pixels = None
    if masks is not None and np.asarray(masks).any():
        pixels = metrics.MaskedPixels(np.asarray(masks))
    per_group = max(1, int(max_bytes // (4 * n * math.prod(delta.shape[3:]))))
    if not image_chunk:  # the chunk of delta, its sorted copies, the path aggregates and the maps
        rows_per_call = min(len(distinct), per_group)
        per_image = 4 * math.prod(delta.shape[3:]) * (t_max * (2 * k_max + rows_per_call) + rows_per_call)
        image_chunk = max_bytes // per_image
    chunk = max(1, min(image_chunk, n))
    score_program = _scores_program(tuple(specs))
    results = {}  # map rule -> (pixel metrics, {spec: image scores})
    seen = {}  # fingerprint -> [(map, its pixel metrics' slot)]
    for g in range(0, len(distinct), per_group):
        program, group = _maps_program(tuple(distinct[g:g + per_group]), t_max)
        maps = np.empty((len(group), n) + delta.shape[3:], np.float32)
        for start in range(0, n, chunk):
            part = np.asarray(delta[start:start + chunk], np.float32)
            if len(part) < chunk:
                part = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], np.float32)])
            maps[:, start:start + chunk] = np.asarray(program(part, times))[:, :min(chunk, n - start)]
        scores = np.asarray(score_program(maps.reshape((-1,) + maps.shape[2:]))).reshape(len(specs), len(group), n)
        slots, todo = [], []  # equal maps share one pixel-metrics computation
        for i in range(len(group)):
            if pixels is None:
                slots.append(dict.fromkeys(metrics.PIXEL_KEYS, math.nan))
                continue
            known = seen.setdefault(_fingerprint(maps[i]), [])
            same = [slot for m, slot in known if np.array_equal(m, maps[i])]
            if not same:
                same = [{}]
                known.append((maps[i], same[0]))
                todo.append((i, same[0]))
            slots.append(same[0])
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy's searches release the GIL
            for (i, slot), value in zip(todo, pool.map(lambda item: pixels(maps[item[0]]), todo)):
                slot.update(value)
        for i, rule in enumerate(group):
            results[rule] = (slots[i], {s: scores[j, i] for j, s in enumerate(specs)})
    rows = []
    for rule in rules:
        pixel, by_spec = results[map_rule(rule)]
        rows.append({**{f: getattr(rule, f) for f in rule_fields()},
                     **metrics.image_metrics(by_spec[rule.image_score], labels), **pixel})
    return rows


def serial_rows(delta, times, rules, labels, masks=None) -> list:
    """The rows of `evaluate_rules`, one rule at a time: `heat_maps` on the rule's subset
    of the stored tensor, `image_score`, then `fmjax.eval.metrics` (the reference)."""
    times = np.asarray(times, np.float32)
    t_max = delta.shape[1]
    rows = []
    for rule in rules:
        index = time_index(rule.num_times, t_max)
        sub = np.asarray(delta[:, index, :rule.num_paths], np.float32)
        maps = heat_maps(jnp.asarray(sub), jnp.asarray(times[index]), rule.aggregate, rule.time_weight,
                         rule.smooth_sigma)
        pixel = dict.fromkeys(metrics.PIXEL_KEYS, math.nan)
        if masks is not None and np.asarray(masks).any():
            pixel = metrics.pixel_metrics(np.asarray(maps), masks)
        scores = np.asarray(image_score(maps, rule.image_score))
        rows.append({**{f: getattr(rule, f) for f in rule_fields()}, **metrics.image_metrics(scores, labels), **pixel})
    return rows
