"""Flow Mismatching as a `Method`: trains the flow-matching velocity network, scores with
the mismatch between its velocity and the straight path's, thresholds on normals."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import data, flow
from fmjax.data import synthetic
from fmjax.errors import ScoreRuleError
from fmjax.eval.calibration import thresholds
from fmjax.methods import image_bank
from fmjax.methods.base import Fitted, Method
from fmjax.methods.flow_mismatch import features as feat
from fmjax.methods.flow_mismatch import learned
from fmjax.methods.flow_mismatch import normalize as norm
from fmjax.methods.flow_mismatch.scorer import Scorer, interior_times, time_weights
from fmjax.training.step import Augment, Objective

__all__ = ["CANDIDATE_ROWS", "METHOD", "FlowMismatch", "feature_bank", "fit_readout", "flow_objective", "patch_bank"]

CANDIDATE_ROWS = 1 << 16  # the feature map's bank is a coreset of at most this many training positions


def flow_objective(config) -> Objective:
    """The flow-matching objective (flow.draw_noise, flow.loss) with the config's time
    sampler, flips and patch crops."""
    cfg = config.train
    draw = functools.partial(flow.draw_noise, sampler=cfg.t_sampler, mean=cfg.logit_normal_mean,
                             std=cfg.logit_normal_std)
    return Objective(draw=draw, loss=flow.loss, augment=Augment(bool(cfg.hflip), bool(cfg.vflip), cfg.patch_size))


def feature_bank(run, trained) -> feat.Bank:
    """The feature memory bank (`image_bank.Bank`) of at most score.feature_bank of the
    training images `trained` (a Split; a draw from score.seed), read with the run's
    scorer (built with score.feature_knn > 0), whitened with score.feature_whiten."""
    settings = run.config.score
    return image_bank.draw_bank(lambda images, class_ids: run.scorer.features(run.params, images, class_ids),
                                trained, settings.feature_bank, settings.seed, settings.feature_whiten)


def patch_bank(run, trained) -> feat.Bank:
    """The feature map's bank (`features.Bank`): the feature rows (image positions) of the
    training images `trained` (a Split), read from enough of them (a seeded draw) for
    CANDIDATE_ROWS rows (or score.patch_bank, if larger), standardised by their own
    statistics (and whitened by their correlations with score.patch_whiten); of more than
    score.patch_bank rows, a greedy k-center coreset (`features.coreset`, seeded by
    score.seed, in those coordinates) stays."""
    settings = run.config.score
    rng = np.random.default_rng([settings.seed, 17])
    grid = jax.eval_shape(run.scorer.patch_fn, run.params, trained.images[:1], trained.class_ids[:1]).shape
    per_image = grid[1] * grid[2]
    count = min(len(trained), -(-max(CANDIDATE_ROWS, settings.patch_bank) // per_image))
    picked = np.sort(rng.permutation(len(trained))[:count])
    rows = run.scorer.patch_features(run.params, trained.images[picked], trained.class_ids[picked])
    bank = feat.bank_from_features(rows.reshape(-1, rows.shape[-1]), settings.patch_whiten)
    if len(bank.features) > settings.patch_bank:
        keep = feat.coreset(bank.features, settings.patch_bank, jax.random.PRNGKey(settings.seed))
        bank = bank._replace(features=bank.features[np.sort(keep)])
    return bank


def fit_readout(run, normals, per_time, feature, stats, scale, arrays) -> np.ndarray:
    """The learned map rule's weights [2T + 1] (`learned.fit_readout`): the held-out
    `normals` (a Split; their per-time maps [N, T, H, W] and feature maps [N, H, W] or
    None) against the same images with one self-supervised defect each, drawn from
    score.seed (`fmjax.data.synthetic`)."""
    settings = run.config.score
    images = normals.images
    if images.shape[1] != images.shape[2]:
        raise ScoreRuleError(f"score.map_rule=learned draws its defects on square images, not "
                             f"{images.shape[1]}x{images.shape[2]}: set data.image_size")
    defective, masks = synthetic.anomaly_set(images, images, seed=settings.seed)
    defect_time = run.scorer.per_time(run.params, defective, normals.class_ids)
    defect_feature = None if feature is None else run.scorer.feature_maps(
        run.params, defective, normals.class_ids, feat.from_arrays(arrays, feat.PATCH_PREFIX))
    return learned.fit_readout(learned.pixel_values(jnp.asarray(per_time), feature, stats, scale),
                               learned.pixel_values(jnp.asarray(defect_time), defect_feature, stats, scale),
                               masks, settings.seed)


class FlowMismatch(Method):
    name = "flow_mismatch"
    model = "flow"

    def objective(self, config) -> Objective:
        return flow_objective(config)

    def scorer(self, config, apply_fn, image_shape, devices=None) -> Scorer:
        features_fn = patch_fn = None
        if config.score.feature_knn or config.score.feature_map:
            from fmjax.nets import unet

            module, _ = unet.build_model(config.net, image_shape)
            conditional = config.net.num_classes > 0
            if config.score.feature_knn:
                features_fn = image_bank.build_features_fn(module, conditional, clean_time=1.0,
                                                           grid=config.score.feature_grid)
            if config.score.feature_map:
                patch_fn = feat.build_patch_features_fn(module, conditional, feat.patch_layers(config.net))
        return Scorer(apply_fn, config.score, image_shape, devices, features_fn, patch_fn)

    def min_holdout(self, config) -> int:
        """Normalisation statistics and the feature map's scale need two held-out normals
        (four to fit them and the thresholds on different images)."""
        return 0 if config.score.normalize == "none" and not config.score.feature_map else 2

    def fit(self, run, trained, holdout) -> Fitted:
        """First the feature banks, from the images the network trained on (`trained`):
        with score.feature_knn > 0 the features of at most score.feature_bank of them, with
        score.feature_map > 0 at most score.patch_bank of their positions' features. Then,
        from one half of the held-out normals (`data.split_halves`), the normalisation
        statistics (score.normalize global or pixel, `normalize.fit_stats`), the feature
        map's scale (`features.map_scale`) and, for score.map_rule = learned, its weights
        (`fit_readout`). Then the thresholds from the other half (a slice
        of fewer than 4 images serves both), scored with what was fitted."""
        settings = run.config.score
        arrays = {}
        if settings.feature_knn:
            arrays.update(feat.to_arrays(feature_bank(run, trained)))
        if settings.feature_map:
            arrays.update(feat.to_arrays(patch_bank(run, trained), feat.PATCH_PREFIX))
        if holdout is None:
            return Fitted(arrays=arrays)
        values, for_thresholds = {}, holdout
        if settings.normalize != "none" or settings.feature_map:
            for_stats = holdout
            if len(holdout) >= 4:
                for_stats, for_thresholds = data.split_halves(holdout)
            values["num_normalization_images"] = len(for_stats)
            per_time = run.scorer.per_time(run.params, for_stats.images, for_stats.class_ids)
            weights = time_weights(interior_times(settings.num_times), settings.time_weight)
            stats = norm.neutral_stats(settings.num_times)
            if settings.normalize != "none":
                stats = norm.fit_stats(per_time, weights, settings.normalize)
                arrays.update(norm.to_arrays(stats))
            feature, scale = None, feat.neutral_banks().scale
            if settings.feature_map:
                rule = "weighted" if settings.map_rule == "learned" else settings.map_rule
                mismatch = norm.mismatch_map(per_time, weights, settings.normalize, rule, stats)
                feature = run.scorer.feature_maps(run.params, for_stats.images, for_stats.class_ids,
                                                  feat.from_arrays(arrays, feat.PATCH_PREFIX))
                scale = feat.map_scale(mismatch, feature)
                arrays.update(feat.scale_to_arrays(scale))
            if settings.map_rule == "learned":
                stats = stats._replace(readout=fit_readout(run, for_stats, per_time, feature, stats, scale, arrays))
                arrays.update(norm.to_arrays(stats))
        maps, scores = run.score(for_thresholds.images, for_thresholds.class_ids, Fitted(arrays=arrays))
        return Fitted(values={**thresholds(run.config.calibration, maps, scores), **values}, arrays=arrays)

    def cost(self, config, image_shape, maps: bool = True) -> dict:
        """K * T network calls per image (one more each for feature image scores and the
        feature map), all independent (one batched program); the feature image score
        without the maps is one call."""
        s = config.score
        extra = (1 if s.feature_knn else 0) + (1 if s.feature_map else 0)
        calls = 1 if s.feature_knn and not maps else s.num_paths * s.num_times + extra
        return {"network_calls_per_image": calls, "sequential_calls_per_image": 1}


METHOD = FlowMismatch()
