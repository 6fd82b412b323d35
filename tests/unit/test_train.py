"""The training loop: the flow-matching loss by hand, the direction of a learned velocity,
the EMA by its formula, the loss falls, the JSONL log, bit-exact resume, the guards against
overwriting and config drift, batch order, the optimizer's update-RMS clip, time samplers,
patch crops, NaN detection, one-device vs two-device equivalence, and the packed gradient
all-reduce."""
import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from references import AffineField, ema_reference

from fmjax import flow
from fmjax.config import TrainConfig, preset
from fmjax.distributed.collectives import PACKED_LEAF_SIZE, psum_packed
from fmjax.distributed.mesh import data_mesh, devices_for_batch
from fmjax.errors import ConfigError, TrainError
from fmjax.methods import registry
from fmjax.nets.unet import build_model
from fmjax.training import loop
from fmjax.training import step as step_lib
from fmjax.training.checkpoints import checkpoint_manager, restore_state
from fmjax.training.loop import batch_indices
from fmjax.training.state import TrainState, init_state, learning_rate, make_optimizer
from fmjax.training.step import Augment, augment, make_step_fn, train_step


def train(config, images, run_dir, **kwargs):
    """The shared loop with the config's method's objective (flow matching here)."""
    return loop.train(config, registry.get(config.method).objective(config), images, run_dir, **kwargs)


def structured_images(n=16, size=16):
    """Grey uint8 [n, size, size, 1]: sinusoidal stripes in 4 orientations x 4 frequencies."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        angle = (i % 4) * np.pi / 4
        freq = 0.3 + 0.1 * (i // 4)
        out.append(127.5 + 120.0 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * freq))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)[..., None]


IMAGES = structured_images()
SHAPE = IMAGES.shape[1:]


def tiny(**train_fields):
    config = preset("tiny")
    return config.replace(train=dataclasses.replace(config.train, **train_fields))


STEPS = 60
CONFIG = tiny(steps=STEPS, log_every=10, checkpoint_every=1000)  # checkpoints at the last step only


def read_log(run_dir):
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 60-step run on the stripes: (run_dir, final state)."""
    run_dir = str(tmp_path_factory.mktemp("run_a"))
    state = train(CONFIG, IMAGES, run_dir, progress=False)
    return run_dir, state


# ----------------------------------------------------------------------------- the objective

def test_flow_loss_equals_the_hand_computed_value():
    """Two one-row images, fixed t and eps, and a network v = 2 x:
    image 1: x = (0.5, -1), eps = (1, 0), t = 0.5: x_t = (0.75, -0.5), v = (1.5, -1),
      u = x - eps = (-0.5, -1): squared errors 4, 0;
    image 2: x = (0, 1), eps = (-1, 1), t = 0.25: x_t = (-0.75, 1), v = (-1.5, 2),
      u = (1, 0): squared errors 6.25, 4.   Mean: 14.25 / 4."""
    x = jnp.asarray([[0.5, -1.0], [0.0, 1.0]]).reshape(2, 1, 2, 1)
    eps = jnp.asarray([[1.0, 0.0], [-1.0, 1.0]]).reshape(2, 1, 2, 1)
    noise = {"t": jnp.asarray([0.5, 0.25]), "eps": eps}
    params = {"w0": 0.0, "w1": 2.0, "w2": 0.0, "w3": 0.0}
    apply_train = lambda p, x, t, y: AffineField.apply(p, x, t, y, train=True)
    loss = flow.loss(params, x, noise, jnp.zeros(2, jnp.int32), apply_train)
    assert float(loss) == pytest.approx(14.25 / 4, rel=1e-6)


def _train_affine_field(images, steps, **train_fields):
    """The real train step (optimizer, EMA) on the four-parameter AffineField:
    (initial state, [params after each step], final state)."""
    config = tiny(**train_fields)
    params = AffineField.init()
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                       opt_state=make_optimizer(config.train).init(params))
    objective = registry.get(config.method).objective(config)
    step = jax.jit(lambda s, x, y, k: train_step(s, x, y, k, objective=objective, module=AffineField,
                                                 config=config))
    labels, key = np.zeros(len(images), np.int32), jax.random.PRNGKey(3)
    initial, trajectory = state, []
    for _ in range(steps):
        state, _ = step(state, images, labels, key)
        trajectory.append(jax.device_get(state.params))
    return initial, trajectory, state


def test_learned_velocity_carries_noise_to_the_data():
    """1-D Gaussian toy: pixels ~ N(mu, s^2). Trained by the real step, the field must agree
    with the exact optimal velocity mu + a(t) (x - t mu), a(t) = (t s^2 - (1 - t)) /
    (t^2 s^2 + (1 - t)^2), point towards the data from either side, and carry noise to the
    data when integrated from t = 0 to 1."""
    rng = np.random.default_rng(0)
    images = np.clip(np.rint(rng.normal(191.0, 12.0, (64, 1, 1, 1))), 0, 255).astype(np.uint8)
    mu, s = float(np.mean(images / 127.5 - 1)), float(np.std(images / 127.5 - 1))
    _, _, state = _train_affine_field(images, 200, batch_size=64, learning_rate=0.05, ema_decay=0.9)
    field = lambda x, t: AffineField.numpy(jax.device_get(state.ema_params), x, t)
    a = lambda t: (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)
    eps, data, t = rng.standard_normal(4000), rng.normal(mu, s, 4000), rng.uniform(0.05, 0.8, 4000)
    x_t = (1 - t) * eps + t * data
    assert np.corrcoef(field(x_t, t), mu + a(t) * (x_t - t * mu))[0, 1] > 0.95
    assert field(mu - 1.0, 0.5) > 1.0 and field(mu + 1.0, 0.5) < -1.0  # exact: +-2 (s << 1)
    x, n = rng.standard_normal(4000), 50
    for i in range(n):
        x = x + field(x, i / n) / n
    assert abs(x.mean() - mu) < 0.05 and x.std() < 0.3, (x.mean(), x.std(), mu, s)


def test_ema_follows_its_formula():
    """After k steps the EMA params are the warm-up EMA of the params after each step."""
    images = IMAGES[:8, :4, :4]
    initial, trajectory, state = _train_affine_field(images, 6, learning_rate=0.05, ema_decay=0.9)
    expected = ema_reference(jax.device_get(initial.params), trajectory, 0.9)
    for name in AffineField.names:
        assert float(state.ema_params[name]) == pytest.approx(expected[name], rel=1e-5, abs=1e-7), name
    assert any(abs(float(state.ema_params[n]) - float(state.params[n])) > 1e-3 for n in AffineField.names)


# ----------------------------------------------------------------------------- the loop

def test_loss_falls(trained):
    log = read_log(trained[0])
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.7 * first, [r["loss"] for r in log]


def test_log_has_one_line_per_logged_step(trained):
    run_dir, state = trained
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(10, STEPS + 1, 10))
    for record in log:
        assert set(record) == {"step", "loss", "grad_norm", "images_per_s"}
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
        assert math.isfinite(record["images_per_s"]) and record["images_per_s"] > 0
    assert int(state.step) == STEPS
    assert checkpoint_manager(run_dir).latest_step() == STEPS


def test_resume_is_bit_exact(trained, tmp_path):
    run_a, state_a = trained
    run_b = str(tmp_path / "run_b")
    stopped = train(CONFIG, IMAGES, run_b, progress=False, stop_at=25)
    assert int(stopped.step) == 25
    assert checkpoint_manager(run_b).latest_step() == 25
    # as if killed after logging beyond its last checkpoint, in the middle of a line
    with open(os.path.join(run_b, "train_log.jsonl"), "a") as f:
        f.write('{"step": 30, "loss": 99.0}\n{"step": 40, "lo')
    state_b = train(CONFIG, IMAGES, run_b, progress=False, resume=True)
    assert int(state_b.step) == STEPS

    assert_trees_equal(state_a.params, state_b.params)
    assert_trees_equal(state_a.ema_params, state_b.ema_params)
    restored_a = restore_state(run_a, CONFIG, SHAPE)
    restored_b = restore_state(run_b, CONFIG, SHAPE)
    assert int(restored_a.step) == int(restored_b.step) == STEPS
    for restored in (restored_a, restored_b):
        assert_trees_equal(state_a.params, restored.params)
        assert_trees_equal(state_a.ema_params, restored.ema_params)
    assert_trees_equal(restored_a.opt_state, restored_b.opt_state)

    # the log goes on where it stopped (a line at the stop), with the same losses as run A:
    # the records after the checkpoint are trained and logged again
    log_a = {r["step"]: r["loss"] for r in read_log(run_a)}
    log_b = read_log(run_b)
    assert [r["step"] for r in log_b] == [10, 20, 25, 30, 40, 50, 60]
    for record in log_b:
        if record["step"] in (10, 20, 40, 50, 60):
            assert record["loss"] == log_a[record["step"]]


def test_refuses_to_overwrite_or_resume_another_config(trained, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained[0], run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = f.read()
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(CONFIG, IMAGES, run_dir, progress=False)
    other = tiny(steps=STEPS, log_every=10, checkpoint_every=1000, learning_rate=5e-4)
    with pytest.raises(TrainError, match="differs"):
        train(other, IMAGES, run_dir, progress=False, resume=True)
    # nothing was touched
    with open(os.path.join(run_dir, "config.json")) as f:
        assert f.read() == saved
    assert checkpoint_manager(run_dir).all_steps() == [STEPS]
    assert len(read_log(run_dir)) == len(read_log(trained[0]))


def test_nan_learning_rate_stops_with_the_step(tmp_path):
    config = tiny(steps=6, log_every=2, checkpoint_every=2, learning_rate=float("nan"))
    run_dir = str(tmp_path / "nan")
    # step 1 uses the finite initial params; its NaN update makes step 2's loss NaN
    with pytest.raises(TrainError, match=r"step 2\b"):
        train(config, IMAGES, run_dir, progress=False)
    assert checkpoint_manager(run_dir).latest_step() is None  # the NaN state was not saved


def test_one_and_two_devices_agree(tmp_path):
    devices = jax.local_devices()
    assert len(devices) == 2, "tests/conftest.py forces two host devices"
    config = tiny(steps=3, log_every=3, checkpoint_every=1000)
    assert config.train.batch_size == 8
    one = train(config, IMAGES, str(tmp_path / "one"), devices=devices[:1], progress=False)
    two = train(config, IMAGES, str(tmp_path / "two"), progress=False)
    # the pmap step (`fmjax train --parallel pmap`) for two steps, resumed by the mesh step
    train(config, IMAGES, str(tmp_path / "pmap"), progress=False, use_pmap=True, stop_at=2)
    pmap = train(config, IMAGES, str(tmp_path / "pmap"), progress=False, resume=True)
    assert int(pmap.step) == 3
    assert len(jax.tree_util.tree_leaves(two.params)[0].sharding.device_set) == 2
    assert len(jax.tree_util.tree_leaves(one.params)[0].sharding.device_set) == 1
    for other in (one, pmap):
        for tree, tree_two in ((other.params, two.params), (other.ema_params, two.ema_params)):
            for a, b in zip(leaves(tree), leaves(tree_two)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # and training moved the params (the comparison is not between two initialisations)
    initial = init_state(config, SHAPE, jax.random.PRNGKey(config.train.seed)).params
    assert any(not np.allclose(a, b) for a, b in zip(leaves(initial), leaves(two.params)))


def test_psum_packed_equals_psum_leaf_by_leaf():
    mesh = data_mesh()
    n = mesh.size
    assert n == 2, "tests/conftest.py forces two host devices"
    rng = np.random.default_rng(0)
    tree = {"large": rng.normal(size=(n, PACKED_LEAF_SIZE)).astype(np.float32),
            "kernel": rng.normal(size=(n, 3, 3, 4, 5)).astype(np.float32),
            "counts": rng.integers(-9, 9, size=(n, 7)).astype(np.int32),
            "bias": [rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n,)).astype(np.float32)],
            "half": rng.normal(size=(n, 6)).astype(jnp.bfloat16)}
    run = lambda fn: jax.jit(jax.shard_map(lambda t: fn(jax.tree.map(lambda a: a[0], t), "data"), mesh=mesh,
                                           in_specs=P("data"), out_specs=P(), check_vma=False))(tree)
    packed, reference = run(psum_packed), run(jax.lax.psum)
    assert jax.tree.structure(packed) == jax.tree.structure(reference)
    for got, want, given in zip(jax.tree.leaves(packed), jax.tree.leaves(reference), jax.tree.leaves(tree)):
        assert got.dtype == want.dtype and got.shape == want.shape == given.shape[1:]
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        np.testing.assert_allclose(np.asarray(want, np.float32), np.asarray(given, np.float32).sum(0), rtol=1e-2)


def test_two_device_step_sums_small_gradients_in_one_operand():
    """XLA:CPU's all-reduce costs per operand: the step packs the tiny net's gradients and
    the loss into one vector (the tree has dozens of leaves)."""
    config = tiny()
    module, _ = build_model(config.net, SHAPE)
    state = init_state(config, SHAPE, jax.random.PRNGKey(0))
    assert all(leaf.size < PACKED_LEAF_SIZE for leaf in leaves(state.params)) and len(leaves(state.params)) > 20
    batch = config.train.batch_size
    objective = registry.get(config.method).objective(config)
    hlo = make_step_fn(objective, module, config, data_mesh()).lower(
        state, np.zeros((batch,) + SHAPE, np.uint8), np.zeros(batch, np.int32), jax.random.PRNGKey(1)
    ).compile().as_text()
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    assert len(all_reduces) == 1, all_reduces
    operands = all_reduces[0].split(" all-reduce(")[1].split(")")[0].split(",")
    assert len(operands) == 1, all_reduces[0]


# ----------------------------------------------------------------------------- pieces

def test_a_batch_uses_the_most_devices_that_divide_it():
    devices = list(range(6))
    assert devices_for_batch(devices, 8) == [0, 1, 2, 3]
    assert devices_for_batch(devices[:3], 8) == [0, 1]
    assert devices_for_batch(devices, 6) == devices and devices_for_batch(devices, 7) == [0]

def test_batch_indices_epochs_and_determinism():
    n, batch, seed = 10, 4, 3
    steps = range(10)  # 40 positions = 4 epochs
    order = np.concatenate([batch_indices(s, n, batch, seed) for s in steps])
    for epoch in range(4):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    # a function of (seed, step) only: any call order, repeated calls, fresh process state
    np.random.seed(123)
    backwards = {s: batch_indices(s, n, batch, seed) for s in reversed(steps)}
    for s in steps:
        np.testing.assert_array_equal(backwards[s], order[s * batch:(s + 1) * batch])
        np.testing.assert_array_equal(batch_indices(s, n, batch, seed), backwards[s])
    other_seed = np.concatenate([batch_indices(s, n, batch, seed + 1) for s in steps])
    assert not np.array_equal(order, other_seed)
    assert not np.array_equal(order[:n], order[n:2 * n])  # each epoch is shuffled anew
    assert batch_indices(0, 3, 8, 0).shape == (8,)  # batch larger than the data


def _max_update_rms(cfg: TrainConfig) -> float:
    """Largest per-tensor RMS of the optimizer's updates over a quiet phase (tiny grads)
    followed by repeated large grads, which pushes Adam's |m_hat| / sqrt(v_hat) above 1."""
    params = {"w": jnp.zeros((64,), jnp.float32), "k": jnp.zeros((4, 4, 8), jnp.float32)}
    tx = make_optimizer(cfg)
    update = jax.jit(tx.update)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    big = {name: jnp.asarray(1e4 * rng.standard_normal(p.shape), jnp.float32) for name, p in params.items()}
    worst = 0.0
    for step in range(205):
        if step < 200:
            grads = {name: jnp.asarray(1e-3 * rng.standard_normal(p.shape), jnp.float32)
                     for name, p in params.items()}
        else:
            grads = big
        updates, state = update(grads, state, params)
        for u in jax.tree_util.tree_leaves(updates):
            worst = max(worst, float(jnp.sqrt(jnp.mean(jnp.square(u)))))
    return worst


def test_update_rms_clip_bounds_the_step():
    lr = 1e-3
    clipped = _max_update_rms(TrainConfig(learning_rate=lr, warmup_steps=0, update_rms_clip=True))
    plain = _max_update_rms(TrainConfig(learning_rate=lr, warmup_steps=0, update_rms_clip=False))
    assert clipped <= lr * (1 + 1e-5)
    assert clipped > 0.5 * lr  # the clip does not just zero the update
    assert plain > 1.5 * lr


def test_time_samplers():
    key = jax.random.PRNGKey(0)
    mean, std = 0.8, 1.2
    t = np.asarray(flow.sample_times(key, 20000, "logit_normal", mean, std))
    assert t.shape == (20000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(np.median(t) - 1 / (1 + math.exp(-mean))) < 0.02
    # logit(t) ~ N(mean, std^2)
    logits = np.log(t) - np.log1p(-t)
    assert abs(logits.std() - std) < 0.05
    u = np.asarray(flow.sample_times(key, 20000, "uniform"))
    assert (u >= 0).all() and (u < 1).all() and abs(u.mean() - 0.5) < 0.01
    with pytest.raises(ValueError):
        flow.sample_times(key, 4, "beta")


def test_patch_crops_are_windows_of_the_inputs():
    n, size, p = 6, 16, 8
    images = jnp.asarray(np.random.default_rng(1).standard_normal((n, size, size, 3)), jnp.float32)
    cfg = Augment(patch_size=p)
    corners = set()
    for seed in range(3):
        out = np.asarray(augment(images, jax.random.PRNGKey(seed), cfg))
        assert out.shape == (n, p, p, 3)
        for i in range(n):
            src = np.asarray(images[i])
            found = [(y, x) for y in range(size - p + 1) for x in range(size - p + 1)
                     if np.array_equal(src[y:y + p, x:x + p], out[i])]
            assert len(found) == 1, f"crop {i} (seed {seed}) is not a window of its own image"
            corners.add(found[0])
    assert len(corners) > 3  # random positions, not one fixed window
    # patch_size 0 leaves the images alone
    np.testing.assert_array_equal(np.asarray(augment(images, jax.random.PRNGKey(0), Augment())),
                                  np.asarray(images))


@pytest.mark.parametrize("warmup, kind", [(0, "constant"), (4, "constant"), (0, "cosine"), (4, "cosine")])
def test_learning_rate_is_what_the_optimizer_applies(warmup, kind):
    # a constant gradient makes Adam's normalised step exactly 1, so each update is -lr(step)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=warmup, steps=12, lr_schedule=kind, final_lr_fraction=0.2,
                      update_rms_clip=False)
    optimizer = make_optimizer(cfg)
    params = {"w": jnp.zeros(3)}
    opt_state = optimizer.init(params)
    rates = []
    for step in range(16):
        updates, opt_state = optimizer.update({"w": jnp.ones(3)}, opt_state, params)
        rates.append(-float(updates["w"][0]))
        assert rates[-1] == pytest.approx(learning_rate(cfg, step), rel=1e-4, abs=1e-9)
    if kind == "cosine":
        assert rates[-1] == pytest.approx(2e-4, rel=1e-4)  # the final fraction after the last step
        assert all(a >= b * (1 - 1e-6) for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # falls after warm-up
    else:
        assert rates[-1] == pytest.approx(1e-3, rel=1e-4)


def test_heldout_loss_is_logged_at_checkpoints_from_the_ema_network(tmp_path, monkeypatch):
    made = []  # the loop's evaluation, reused here compiled
    monkeypatch.setattr(loop, "make_heldout_loss_fn", lambda *a, **k: made.append(step_lib.make_heldout_loss_fn(*a, **k))
                        or made[-1])
    config = tiny(steps=20, log_every=5, checkpoint_every=10, heldout_loss=True)
    heldout = (structured_images(8)[::-1].copy(), np.zeros(8, np.int32))
    train(config, IMAGES, str(tmp_path / "run"), progress=False, heldout=heldout)
    records = read_log(str(tmp_path / "run"))
    assert [r["step"] for r in records if "heldout_loss" in r] == [10, 20]
    evaluate = made[0]
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 2)
    state = restore_state(str(tmp_path / "run"), config, SHAPE)
    want = evaluate(state.ema_params, *heldout, key)
    assert records[-1]["heldout_loss"] == pytest.approx(want, rel=1e-5)
    assert evaluate(state.params, *heldout, key) != pytest.approx(want, rel=1e-5)  # the EMA, not the raw weights
    assert evaluate(state.ema_params, *heldout, key) == want  # the same draws every time


def test_heldout_loss_only_where_asked_and_possible():
    config = tiny(heldout_loss=True)
    objective = registry.get(config.method).objective(config)
    module, _ = build_model(config.net, SHAPE)
    heldout = (IMAGES[:4], np.zeros(4, np.int32))
    assert loop.heldout_evaluator(config, objective, module, heldout, False) is not None
    assert loop.heldout_evaluator(tiny(heldout_loss=False), objective, module, heldout, False) is None
    assert loop.heldout_evaluator(tiny(heldout_loss=False, early_stop_patience=3), objective, module, heldout,
                                  False) is not None
    assert loop.heldout_evaluator(config, objective, module, None, False) is None
    assert loop.heldout_evaluator(config, objective, module, heldout, True) is None  # several processes
    assert preset("texture").train.heldout_loss and not preset("tiny").train.heldout_loss


def test_early_stop_after_patience_checkpoints_without_a_lower_heldout_loss(tmp_path, monkeypatch):
    scripted = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6])  # 0.8 is the best when two checkpoints fail to beat it
    monkeypatch.setattr(loop, "make_heldout_loss_fn", lambda *a, **k: lambda *args: next(scripted))
    config = tiny(steps=60, log_every=10, checkpoint_every=10, early_stop_patience=2)
    heldout = (structured_images(4), np.zeros(4, np.int32))
    run_dir = str(tmp_path / "run")
    state = train(config, IMAGES, run_dir, progress=False, heldout=heldout)
    assert int(state.step) == 40
    assert [r["heldout_loss"] for r in read_log(run_dir) if "heldout_loss" in r] == [1.0, 0.8, 0.9, 0.85]
    assert int(train(config, IMAGES, run_dir, progress=False, resume=True, heldout=heldout).step) == 40
    with pytest.raises(ConfigError, match="early_stop_patience"):
        train(config, IMAGES, str(tmp_path / "other"), progress=False)
