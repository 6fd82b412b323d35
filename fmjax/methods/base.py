"""The interface every anomaly-detection method implements, and what it fits on normals.

A method trains one network through the shared training loop (`objective`), scores
images with a jitted scorer (`scorer`), fits what it needs on normal training images
after training (`fit`: thresholds, a forest, normalisation statistics), decides which
images are anomalous (`decide`) and states its cost per image (`cost`). It registers by
name in `fmjax.methods.registry`; nothing outside `fmjax/methods/` asks which method a
run uses.

Adding a method (docs/method.md shows it in full): a folder `fmjax/methods/NAME/` with
`settings.py` (a frozen `Settings` dataclass, `PRESETS`, `NEUTRAL`, `TRAINING`,
`validate(config)`) and `method.py` (`METHOD = MyMethod()`), plus one line in
`registry.METHODS`.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import numpy as np

from fmjax.eval.calibration import thresholds
from fmjax.methods import registry

__all__ = ["Fitted", "Method", "ScoringProgram"]


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a method fitted on normal images after training, stored in the run folder:
    `values` as JSON (thresholds, offsets; RUN/calibration.json) and `arrays`, named numpy
    arrays (a forest's trees, normalisation statistics; RUN/calibration.npz). Never pickled."""

    values: dict = dataclasses.field(default_factory=dict)
    arrays: dict = dataclasses.field(default_factory=dict)

    def get(self, key, default=None):
        return self.values.get(key, default)


@dataclasses.dataclass(frozen=True)
class ScoringProgram:
    """A method's whole jitted scoring on one device, as `fmjax export` serializes it:
    fn(params, consts, images uint8 [batch,H,W,C], class_ids int32 [batch]) ->
    (maps float32 [batch,H,W], outputs float32 [batch, ...]), a pure function of its
    arguments; consts: the pytree of arrays it needs beside the params (fixed noise,
    times, the fitted arrays that enter the jitted code). `finish` turns the outputs into
    image scores outside the program, in numpy: "scores" (they are the scores) or
    "isolation_forest" (they are a forest's features; the forest is `finish_fitted`).
    `decision`: (">=" or ">", threshold): an image is anomalous where its score compares
    so with the threshold; None when nothing was fitted to decide with."""

    fn: Callable
    consts: Any
    batch: int
    finish: str = "scores"
    finish_fitted: "Fitted | None" = None
    decision: tuple | None = None


class Method(abc.ABC):
    """One anomaly-detection method. Subclasses set `name` (its registry name) and `model`
    (the network it trains: methods with the same model can score each other's runs)."""

    name: str = ""
    model: str = ""
    decision_rule: str = "the normal-image threshold"  # how `decide` labels images, for messages

    # ------------------------------------------------------------------ settings
    @property
    def settings(self):
        """The method's settings module (Settings, PRESETS, NEUTRAL, TRAINING, validate)."""
        return registry.settings_module(self.name)

    def validate(self, config) -> None:
        """ConfigError for settings that cannot work (called by fmjax.config.validate too)."""
        self.settings.validate(config)

    def needs_refit(self, saved, new) -> bool:
        """Whether what was fitted with scoring settings `saved` is stale under `new`: any
        field but the NEUTRAL ones (batching, chunking) changed."""
        neutral = {name: None for name in self.settings.NEUTRAL}
        return dataclasses.replace(saved, **neutral) != dataclasses.replace(new, **neutral)

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def objective(self, config):
        """The `fmjax.training.step.Objective` this method's network trains with."""

    def fit_to_image_size(self, config):
        """The config with the scoring settings that depend on the image side adapted to
        `config.data.image_size`, for the `auto` preset, which chooses that side from the
        data (fmjax.app.train.resolve_auto). Default: unchanged."""
        return config

    def init_shape(self, config, image_shape) -> tuple:
        """The image shape (h, w, C) the network's parameters are initialised at."""
        return tuple(image_shape)

    # ------------------------------------------------------------------ scoring
    @abc.abstractmethod
    def scorer(self, config, apply_fn, image_shape, devices=None):
        """An object with score(params, images uint8 [N,H,W,C], class_ids int [N] or None,
        fitted: Fitted) -> (maps float32 [N,H,W], scores float32 [N]) as numpy, higher =
        more anomalous; apply_fn(params, x, t, y) is the network in eval mode."""

    def min_holdout(self, config) -> int:
        """The fewest held-out normal images `fit` can work with (checked before training)."""
        return 0

    def program(self, run, apply_fn=None) -> ScoringProgram:
        """The run's whole scoring as one device's pure function (`ScoringProgram`), for
        export: the same jitted function its scorer runs on every device. apply_fn: the
        network to use (default: the run's). Its `decision` follows `decide`: score >= the
        image threshold."""
        scorer = run.scorer if apply_fn is None else self.scorer(run.config, apply_fn, run.image_shape)
        if not hasattr(scorer, "program"):
            from fmjax.errors import RunError

            raise RunError(f"method {self.name} has no exportable scoring program")
        program = scorer.program(run.params, run.fitted)
        threshold = run.fitted.get("image_threshold")
        return dataclasses.replace(program, decision=None if threshold is None else (">=", float(threshold)))

    def resolve_settings(self, run, trained, holdout) -> tuple:
        """(the run's scoring settings with those this method chooses from the data chosen,
        a JSON-able account of the choice, {} when nothing was chosen), before `fit`;
        arguments as `fit`'s. Default: the settings as they are."""
        return run.config.score, {}

    def fit(self, run, trained, holdout) -> Fitted:
        """What this method fits on normal images after training. `run` scores with the
        trained network (`run.score`, `run.scorer`, `run.params`, `run.config`);
        trained: the normal training images the network trained on, holdout: the held-out
        normals (both `fmjax.data.Split`; holdout None when nothing is held out). Default:
        thresholds from the held-out normals (`fmjax.eval.calibration.thresholds`)."""
        if holdout is None:
            return Fitted()
        maps, scores = run.score(holdout.images, holdout.class_ids, Fitted())
        return Fitted(values=thresholds(run.config.calibration, maps, scores))

    def decide(self, scores, fitted: Fitted) -> np.ndarray | None:
        """Predicted labels int32 [N] (1 = anomalous) for scores from the scorer, or None
        when nothing was fitted to decide with. Default: score >= the image threshold."""
        threshold = fitted.get("image_threshold")
        return None if threshold is None else (np.asarray(scores) >= threshold).astype(np.int32)

    def metrics(self, labels, decided) -> dict:
        """Method-specific metrics of the decisions `decided` against labels (0/1)."""
        return {}

    @abc.abstractmethod
    def cost(self, config, image_shape, maps: bool = True) -> dict:
        """{"network_calls_per_image": all network evaluations one image needs,
        "sequential_calls_per_image": those that must run one after another}; with
        maps=False, of the image scores alone (`Run.image_scores`)."""
