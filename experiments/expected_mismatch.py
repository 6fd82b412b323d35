"""A learned expected mismatch against the texture preset's rule, on validation data only.

The issue behind it: on a busy texture a normal crop's mismatch is high wherever the
texture is hard to predict, so busy normal regions can outscore a smooth defect. A second
network E(x_t, t) -> s = log of the expected squared mismatch per pixel is trained on the
run's training normals with a Gaussian likelihood of the frozen flow model's mismatch
delta = sum_c (v(x_t, t) - (x - eps))^2 (loss: delta * exp(-s) + s, minimised at
exp(s) = E[delta | x_t, t]), with the flow model's U-Net architecture and one output
channel, Adam, EMA and flips as the flow model trains. The validation crops are then
scored with the ratio delta / exp(s) in place of delta.

Data as experiments/select_settings.py reads it (`validation_data`): A, held-out normals,
fits the statistics and the feature map's scale; B are the validation normals, B with
three self-supervised defects each the anomalies. No test split is read. Criterion: the
mean of image and pixel AUROC. Rows: the preset's rule (and its mismatch map alone, without
the feature map) on delta, and rules on the ratio, alone and mixed with the feature map as
the preset mixes it.

    python experiments/expected_mismatch.py --out OUT --runs RUNS --texture-steps 600

Writes OUT/expected_mismatch.json and .md; OUT/NAME.npz keeps each texture's delta and s
(`--resume` reads them instead of training E again).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_settings  # noqa: E402
from table import command_line  # noqa: E402

BATCH, EMA_DECAY, LEARNING_RATE = 32, 0.995, 1e-3


def train_expectation(run, images: np.ndarray, steps: int, seed: int = 7):
    """EMA parameters of E (the run's U-Net, one output channel) after `steps` Adam steps on
    uint8 `images` [N, H, W, C] (random flips, uniform t), the flow model frozen."""
    import jax
    import jax.numpy as jnp
    import optax

    from fmjax import xla_options
    from fmjax.distributed.mesh import data_mesh, replicated, rows
    from fmjax.flow import path_point, target_velocity, to_model_range
    from fmjax.nets import unet

    _, flow_apply = unet.build_model(run.config.net, run.image_shape)
    module = unet.UNet(run.config.net, out_channels=1)
    key = jax.random.PRNGKey(seed)
    params = module.init(key, jnp.zeros((1,) + run.image_shape), jnp.zeros((1,)))
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(params)

    def nll(params, flow_params, x, t, eps):
        xt = path_point(eps, x, t)
        delta = jnp.sum(jnp.square(flow_apply(flow_params, xt, t) - target_velocity(eps, x)), -1)
        s = module.apply(params, xt, t)[..., 0]
        return jnp.mean(jax.lax.stop_gradient(delta) * jnp.exp(-s) + s)

    def step(params, opt_state, flow_params, batch, key):
        k_t, k_eps, k_h, k_v = jax.random.split(key, 4)
        x = to_model_range(batch)
        x = jnp.where(jax.random.bernoulli(k_h, 0.5, (x.shape[0], 1, 1, 1)), x[:, :, ::-1], x)
        x = jnp.where(jax.random.bernoulli(k_v, 0.5, (x.shape[0], 1, 1, 1)), x[:, ::-1], x)
        t = jax.random.uniform(k_t, (x.shape[0],))
        eps = jax.random.normal(k_eps, x.shape)
        loss, grads = jax.value_and_grad(nll)(params, flow_params, x, t, eps)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    mesh = data_mesh(jax.local_devices())
    step = xla_options.jit(step, in_shardings=(replicated(mesh),) * 3 + (rows(mesh), replicated(mesh)))
    ema_update = xla_options.jit(lambda e, p: jax.tree.map(lambda a, b: EMA_DECAY * a + (1 - EMA_DECAY) * b, e, p))
    rng, ema, start = np.random.default_rng(0), params, time.time()
    for i in range(steps):
        batch = jnp.asarray(images[rng.integers(0, len(images), BATCH)])
        params, opt_state, loss = step(params, opt_state, run.params, batch, jax.random.fold_in(key, i))
        ema = ema_update(ema, params)
        if i % 100 == 0:
            print(f"  E step {i}: loss {float(loss):.3f} ({time.time() - start:.0f} s)", flush=True)
    return jax.device_get(ema)


def mismatch_and_expectation(run, expectation, images: np.ndarray, num_paths: int, num_times: int, seed: int = 0):
    """delta and s, float32 [N, T, K, H, W] each, of uint8 `images` [N, H, W, C] at the
    scorer's times and path noise (the same delta as `select_settings.stored_mismatch`)."""
    import jax
    import jax.numpy as jnp

    from fmjax import xla_options
    from fmjax.flow import path_point, target_velocity, to_model_range
    from fmjax.methods.flow_mismatch.scorer import interior_times, path_noise
    from fmjax.nets import unet

    _, flow_apply = unet.build_model(run.config.net, run.image_shape)
    module = unet.UNet(run.config.net, out_channels=1)
    noise = path_noise(jax.random.PRNGKey(seed), num_paths, run.image_shape)
    times = jnp.asarray(interior_times(num_times))

    def one_image(flow_params, params, image):
        y = to_model_range(image)

        def one_time(t):
            tt = jnp.full((num_paths,), t)
            xt = path_point(noise, jnp.broadcast_to(y, noise.shape), tt)
            delta = jnp.sum(jnp.square(flow_apply(flow_params, xt, tt) - target_velocity(noise, y[None])), -1)
            return delta, module.apply(params, xt, tt)[..., 0]

        return jax.lax.map(one_time, times)

    one_image = xla_options.jit(one_image)
    flow_params = jax.device_get(run.params)
    pairs = [one_image(flow_params, expectation, jnp.asarray(image)) for image in images]
    return np.stack([np.asarray(d) for d, _ in pairs]), np.stack([np.asarray(s) for _, s in pairs])


def texture_rows(name: str, args) -> dict:
    """{row name: (image AUROC, pixel AUROC)} of one texture's validation data."""
    import jax.numpy as jnp
    from sklearn.metrics import roc_auc_score

    from fmjax.eval import metrics
    from fmjax.methods.flow_mismatch import features as feat
    from fmjax.methods.flow_mismatch import normalize as norm
    from fmjax.methods.flow_mismatch.scorer import heat_maps, interior_times, per_time_maps, time_weights
    from fmjax.methods.flow_mismatch.settings import PRESETS
    from fmjax.methods.maps import gaussian_smooth, image_score

    preset = PRESETS["texture"]
    run, sets, masks, _, _, trained = select_settings.validation_data(name, f"textures:{name}", None, "texture", args)
    stored = os.path.join(args.out, f"{name}.npz")
    if args.resume and os.path.exists(stored):
        with np.load(stored) as z:
            delta, log_expected = {k: z["d" + k] for k in "ABV"}, {k: z["s" + k] for k in "ABV"}
    else:
        expectation = train_expectation(run, trained.images, args.steps)
        delta, log_expected = {}, {}
        for k in "ABV":
            delta[k], log_expected[k] = mismatch_and_expectation(run, expectation, sets[k], preset.num_paths,
                                                                 preset.num_times, preset.seed)
        np.savez(stored, **{"d" + k: v for k, v in delta.items()}, **{"s" + k: v for k, v in log_expected.items()})
    ratio = {k: delta[k] / np.exp(log_expected[k]) for k in "ABV"}
    times = jnp.asarray(interior_times(preset.num_times))
    feature = {k: np.asarray(gaussian_smooth(jnp.asarray(v), preset.smooth_sigma))
               for k, v in select_settings.feature_maps(run, trained, sets).items()}

    def criterion(maps):
        both = np.concatenate([maps["B"], maps["V"]])
        labels = np.r_[np.zeros(len(maps["B"])), np.ones(len(maps["V"]))]
        pixels = np.concatenate([np.zeros(maps["B"].shape, bool), masks > 0]).ravel()
        scores = np.asarray(image_score(jnp.asarray(both), preset.image_score))
        return metrics.image_metrics(scores, labels)["image_auroc"], float(roc_auc_score(pixels, both.ravel()))

    def mismatch_maps(values, aggregate, time_weight, map_rule):
        weights = time_weights(times, time_weight)
        per_time_a = per_time_maps(jnp.asarray(values["A"]), aggregate, preset.smooth_sigma)
        stats = norm.fit_stats(per_time_a, weights, preset.normalize)
        return {k: np.asarray(heat_maps(jnp.asarray(values[k]), times, aggregate, time_weight, preset.smooth_sigma,
                                        preset.normalize, map_rule, stats)) for k in "ABV"}

    def with_feature(maps):
        scale = feat.map_scale(maps["A"], feature["A"])
        return {k: np.asarray(feat.combine_maps(maps[k], feature[k], scale, preset.feature_map)) for k in "ABV"}

    standard = lambda maps: {k: (maps[k] - maps["A"].mean()) / maps["A"].std() for k in "ABV"}
    preset_maps = mismatch_maps(delta, preset.aggregate, preset.time_weight, preset.map_rule)
    ratio_maps = mismatch_maps(ratio, "mean", "none", "two_sided")
    candidates = {
        "the preset's rule on delta": preset_maps,
        "the preset's rule on delta / exp(s)": mismatch_maps(ratio, preset.aggregate, preset.time_weight,
                                                             preset.map_rule),
        "delta / exp(s), mean over paths, two-sided, no time weight": ratio_maps,
        "half the preset's map, half the ratio's (above)": {
            k: 0.5 * standard(preset_maps)[k] + 0.5 * standard(ratio_maps)[k] for k in "ABV"},
    }
    rows = {}
    for row, maps in candidates.items():
        rows[row + ", alone"] = criterion(maps)
        rows[row + ", + feature map"] = criterion(with_feature(maps))
    return rows


def write_report(results: dict, out: str) -> None:
    names = list(results)
    rows = list(results[names[0]])
    crit = lambda row, n: float(np.mean(results[n][row]))
    lines = ["# A learned expected mismatch on validation data", "",
             f"Command: `{command_line()}`", "",
             "Each cell: image / pixel AUROC (criterion: their mean). Validation normals and self-supervised defects "
             "made from them; no test split is read. *+ feature map*: mixed with the encoder's feature map as the "
             "texture preset mixes it.", "",
             "| map | " + " | ".join(names) + " | mean criterion |", "|---" * (len(names) + 2) + "|"]
    for row in rows:
        cells = " | ".join(f"{results[n][row][0]:.3f} / {results[n][row][1]:.3f}" for n in names)
        lines.append(f"| {row} | {cells} | {np.mean([crit(row, n) for n in names]):.3f} |")
    with open(os.path.join(out, "expected_mismatch.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "expected_mismatch.json"), "w") as f:
        json.dump({"command": command_line(), "results": results}, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    p = select_settings.texture_study_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="training steps of E")
    p.add_argument("--resume", action="store_true", help="read OUT/NAME.npz where it exists")
    args = p.parse_args()
    write_report(select_settings.run_texture_study(args, texture_rows), args.out)


if __name__ == "__main__":
    main()
