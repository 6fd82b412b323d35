"""Data parallelism: global-batch dropout, the shared step pieces, replicate/shard helpers,
the multi-host batch arithmetic and start-up; and (slow) the pmap step against the mesh
step on 4 devices and on 1 with dropout, flips, patches and a stop-and-resume (in a
subprocess with 4 host devices), and two processes of 2 devices against one process of 4.
The default run compares pmap and mesh training on 2 devices (tests/unit/test_train.py)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DISTRIBUTED_VARS, ROOT, subprocess_env

from fmjax.distributed import multihost, placement
from fmjax.distributed.mesh import global_mesh
from fmjax.errors import FmjaxWarning, LaunchError
from fmjax.flow import to_model_range
from fmjax.nets.layers import global_dropout
from fmjax.training.loop import batch_indices, host_batch_indices
from fmjax.training.step import Augment, Objective, apply_augment, augment, draw_step, slice_draws

# the tiny preset with flips, patch crops, logit-normal times and dropout switched on, so
# every random draw of the step is compared; global batch 8 over 4 devices, 4 steps
EQUALITY_SCRIPT = textwrap.dedent("""
    import dataclasses, functools, json, os, sys
    import jax, numpy as np
    from fmjax import xla_options
    from fmjax.config import build
    from fmjax.distributed import placement
    from fmjax.distributed.mesh import data_mesh, replicated, rows
    from fmjax.methods import registry
    from fmjax.nets import unet
    from fmjax.training import loop, step as step_lib
    from fmjax.training.state import init_state

    assert jax.local_device_count() == 4, jax.local_devices()
    base = build("tiny")
    config = base.replace(net=dataclasses.replace(base.net, dropout=0.1),
                          train=dataclasses.replace(base.train, hflip=True, vflip=True, patch_size=8,
                                                    t_sampler="logit_normal"))
    batch, steps, shape = config.train.batch_size, 4, (16, 16, 1)
    assert batch == 8
    images = np.random.default_rng(0).integers(0, 256, (16,) + shape, dtype=np.uint8)
    class_ids = np.zeros(len(images), np.int32)
    batches = [loop.batch_indices(s, len(images), batch, 0) for s in range(steps)]

    def mesh_path(config, devices, init, run_key):
        mesh = data_mesh(devices)
        module = unet.UNet(config.net, out_channels=shape[-1])
        objective = registry.get(config.method).objective(config)
        state, out = jax.device_put(init, replicated(mesh)), []
        step_fn = step_lib.make_step_fn(objective, module, config, mesh)
        for idx in batches:
            state, m = step_fn(state, jax.device_put(images[idx], rows(mesh)),
                               jax.device_put(class_ids[idx], rows(mesh)), jax.device_put(run_key, replicated(mesh)))
            out.append(jax.device_get(m))
        return jax.device_get(state), out

    def pmap_path(config, devices, init, run_key):
        n = len(devices)
        module = unet.UNet(config.net, out_channels=shape[-1])
        objective = registry.get(config.method).objective(config)
        state = placement.replicate(init, devices)
        step_fn, out = step_lib.make_pmap_step_fn(objective, module, config, devices), []
        for idx in batches:
            state, m = step_fn(state, placement.shard_batch(images[idx], n), placement.shard_batch(class_ids[idx], n),
                               run_key)
            m = jax.device_get(m)
            for name, per_device in m.items():  # summed over devices: every device reports the same
                assert np.all(per_device == per_device[0]), (name, per_device)
            out.append({name: per_device[0] for name, per_device in m.items()})
        assert jax.tree.leaves(state.params)[0].shape[0] == n
        copies = jax.device_get(state.params)
        for leaf in jax.tree.leaves(copies):  # the replicas stay identical
            assert all(np.array_equal(leaf[0], leaf[d]) for d in range(n))
        return jax.device_get(placement.unreplicate(state)), out

    def single_step_path(device, init, run_key):  # train_step without a mesh, on one device
        objective = registry.get(config.method).objective(config)
        module = unet.UNet(config.net, out_channels=shape[-1])
        step_fn = xla_options.jit(functools.partial(step_lib.train_step, objective=objective, module=module,
                                                    config=config))
        state, out = jax.device_put(init, device), []
        for idx in batches:
            state, m = step_fn(state, images[idx], class_ids[idx], run_key)
            out.append(jax.device_get(m))
        return jax.device_get(state), out

    def assert_close(trees, ref, name):
        for tree, ref_tree in zip(trees, ref):
            leaves, ref_leaves = jax.tree.leaves(tree), jax.tree.leaves(ref_tree)
            assert len(leaves) == len(ref_leaves) > 0
            for a, b in zip(leaves, ref_leaves):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)

    devices = jax.local_devices()
    init_key, run_key = registry.get(config.method).objective(config).seed_keys(0)
    init = jax.device_get(init_state(config, shape, init_key))
    runs = {"mesh4": mesh_path(config, devices, init, run_key), "pmap4": pmap_path(config, devices, init, run_key),
            "mesh1": mesh_path(config, devices[:1], init, run_key)}
    # on one device the mesh step is train_step itself, bit for bit
    single_state, single_metrics = single_step_path(devices[0], init, run_key)
    mesh1_state, mesh1_metrics = runs["mesh1"]
    for a, b in zip(jax.tree.leaves(single_state), jax.tree.leaves(mesh1_state)):
        np.testing.assert_array_equal(a, b)
    assert [float(m["loss"]) for m in single_metrics] == [float(m["loss"]) for m in mesh1_metrics]
    ref_state, _ = runs["mesh4"]
    for name, (state, _) in runs.items():
        assert int(state.step) == steps, (name, state.step)
        assert_close((state.params, state.ema_params), (ref_state.params, ref_state.ema_params), name)
    moved = any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(ref_state.params)))
    result = {"moved": moved, **{name: {"loss": [float(m["loss"]) for m in metrics],
                                        "grad_norm": [float(m["grad_norm"]) for m in metrics]}
                                 for name, (_, metrics) in runs.items()}}

    # the training loop's pmap option: stop at 2, resume to 4
    loop_config = config.replace(train=dataclasses.replace(config.train, steps=steps, log_every=1,
                                                           checkpoint_every=1000))
    objective = registry.get(config.method).objective(loop_config)
    run_dir = os.path.join(sys.argv[1], "run")
    loop.train(loop_config, objective, images, run_dir, class_ids=class_ids, progress=False, use_pmap=True, stop_at=2)
    state = loop.train(loop_config, objective, images, run_dir, class_ids=class_ids, progress=False, use_pmap=True,
                       resume=True)
    assert int(state.step) == steps
    assert_close((state.params,), (ref_state.params,), "loop.train(use_pmap=True)")
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        result["train_pmap_log"] = [json.loads(line) for line in f]
    # sharded scoring: 1 and 3 images spread their (time, path) grid over the 4 devices,
    # 6 images go 4 + 2 by image; every count scores as on one device
    from fmjax.methods.flow_mismatch.scorer import Scorer
    _, apply_fn = unet.build_model(config.net, shape)
    score_cfg = dataclasses.replace(config.score, num_paths=3, num_times=2, chunk_size=2, image_batch=1)
    spread, alone = (Scorer(apply_fn, score_cfg, shape, devices=d) for d in (devices, devices[:1]))
    for n in (1, 3, 6):
        for got, want in zip(spread.score(ref_state.params, images[:n]), alone.score(ref_state.params, images[:n])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"score {n} images")
        np.testing.assert_allclose(spread.delta(ref_state.params, images[:n]), alone.delta(ref_state.params, images[:n]),
                                   rtol=1e-5, atol=1e-6, err_msg=f"delta {n} images")
    result["grid_programs"] = sorted(spread._grids)
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_pmap_mesh4_and_mesh1_agree_on_four_devices(tmp_path):
    script = tmp_path / "equality.py"
    script.write_text(EQUALITY_SCRIPT)
    # a compilation cache: train(use_pmap=True) reuses the pmap path's program
    env = subprocess_env(4, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
                         JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["moved"], "training did not change the params"
    ref = result["mesh4"]
    assert len(ref["loss"]) == 4 and all(np.isfinite(ref["loss"]))
    for name in ("pmap4", "mesh1"):
        np.testing.assert_allclose(result[name]["loss"], ref["loss"], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(result[name]["grad_norm"], ref["grad_norm"], rtol=1e-4, err_msg=name)
    assert result["grid_programs"] == [["delta", 1], ["delta", 3], ["maps", 1], ["maps", 3]]
    log = result["train_pmap_log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in log], ref["loss"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pieces (2 devices)

def test_global_dropout_equals_unsharded_dropout():
    n = jax.local_device_count()
    assert n == 2, "tests/conftest.py forces two host devices"
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 3))
    key = jax.random.PRNGKey(7)
    modules = (nn.Dropout(0.3, deterministic=False), nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False))
    apply_all = lambda rows: [m.apply({}, rows, rngs={"dropout": key}) for m in modules]

    def sharded(rows):
        with global_dropout(jax.lax.axis_index("data"), jax.lax.axis_size("data")):
            return apply_all(rows)

    references = jax.jit(apply_all)(x)
    outs = jax.pmap(sharded, axis_name="data")(placement.shard_batch(x, n))
    for out, reference in zip(outs, references):
        np.testing.assert_array_equal(np.asarray(out).reshape(x.shape), reference)
        assert 0 < np.mean(np.asarray(reference) == 0) < 1  # some dropped, some kept
    # deterministic calls pass through untouched
    with global_dropout(0, 2):
        np.testing.assert_array_equal(nn.Dropout(0.3, deterministic=True).apply({}, x), x)


def test_draws_match_train_augment_and_slice_by_rows():
    from fmjax.config import build
    from fmjax.methods import registry

    config = build("tiny", "flow_mismatch", ["train.hflip=true", "train.vflip=true", "train.patch_size=8",
                                             "train.t_sampler=logit_normal"])
    objective = registry.get("flow_mismatch").objective(config)
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)

    @jax.jit
    def both(images, key):
        x = to_model_range(images)
        draws = draw_step(key, x.shape, objective)
        key_aug = jax.random.split(key, 3)[0]  # train_step's split: (augment, loss, dropout)
        ours = apply_augment(x, draws.hflip, draws.vflip, draws.corners, 8)
        return ours, augment(x, key_aug, objective.augment), draws, slice_draws(draws, 2, 2)

    ours, theirs, draws, part = both(images, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(ours, theirs)
    assert draws.noise["t"].shape == (6,) and draws.noise["eps"].shape == (6, 8, 8, 1)
    assert draws.hflip.shape == (6, 1, 1, 1)
    for field in ("hflip", "vflip", "corners"):
        np.testing.assert_array_equal(getattr(part, field), getattr(draws, field)[2:4])
    for name in ("t", "eps"):
        np.testing.assert_array_equal(part.noise[name], draws.noise[name][2:4])
    plain_objective = Objective(draw=objective.draw, loss=objective.loss, augment=Augment())
    plain = jax.eval_shape(lambda key: draw_step(key, (6, 16, 16, 1), plain_objective), jax.random.PRNGKey(0))
    assert plain.hflip is None and plain.vflip is None and plain.corners is None
    assert plain.noise["eps"].shape == (6, 16, 16, 1)


def test_replicate_unreplicate_and_shard_batch():
    devices = jax.local_devices()
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
    rep = placement.replicate(tree, devices)
    assert rep["w"].shape == (2, 2, 3) and rep["step"].shape == (2,)
    assert rep["w"].sharding.device_set == set(devices)
    for shard in rep["w"].addressable_shards:
        np.testing.assert_array_equal(shard.data[0], tree["w"])
    back = placement.unreplicate(rep)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert int(back["step"]) == 3
    x = np.arange(8 * 3).reshape(8, 3)
    sharded = placement.shard_batch(x, 4)
    assert sharded.shape == (4, 2, 3)
    np.testing.assert_array_equal(sharded[1], x[2:4])
    with pytest.raises(ValueError, match="multiple of 3"):
        placement.shard_batch(x, 3)


def test_assemble_global_batch_single_process():
    mesh = global_mesh()
    x = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    batch = placement.assemble_global_batch(x, mesh)
    assert batch.shape == (4, 2) and len(batch.sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(batch, x)


# ----------------------------------------------------------------------------- multi-host

@pytest.mark.parametrize("num_items,global_batch,seed", [(16, 8, 0), (10, 4, 3), (7, 8, 1)])
def test_host_batches_concatenate_to_the_single_host_batch(num_items, global_batch, seed):
    for step in range(6):  # spans several epochs (and batches across an epoch's end)
        single = batch_indices(step, num_items, global_batch, seed)
        for count in (1, 2, 4):
            parts = [host_batch_indices(step, num_items, global_batch, seed, p, count) for p in range(count)]
            assert all(len(part) == global_batch // count for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), single)
    # defaults: this (single) process reads the whole batch
    np.testing.assert_array_equal(host_batch_indices(2, num_items, global_batch, seed),
                                  batch_indices(2, num_items, global_batch, seed))


def test_process_shard_and_is_writer():
    assert multihost.process_shard(8, 0, 1) == slice(0, 8)
    assert [multihost.process_shard(8, p, 4) for p in range(4)] == [slice(2 * p, 2 * p + 2) for p in range(4)]
    with pytest.raises(ValueError, match="multiple of 3"):
        multihost.process_shard(8, 0, 3)
    with pytest.raises(ValueError, match="not in"):
        multihost.process_shard(8, 2, 2)
    assert multihost.is_writer(0) and not multihost.is_writer(1) and not multihost.is_writer(3)
    assert multihost.is_writer()  # the only process here is process 0


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in DISTRIBUTED_VARS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_maybe_initialize_distributed_without_env_does_nothing(fake_initialize):
    assert multihost.maybe_initialize_distributed() is False
    assert multihost.maybe_initialize_distributed({}) is False
    single_slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                    "SLURM_LOCALID": "0"}
    assert multihost.maybe_initialize_distributed(single_slurm) is False
    assert multihost.maybe_initialize_distributed({"TPU_WORKER_HOSTNAMES": "only-host"}) is False
    # a generic variable another program may set does not make a multi-process run
    assert multihost.maybe_initialize_distributed({"COORDINATOR_ADDRESS": "10.0.0.2:99"}) is False
    assert fake_initialize == []


def test_slurm_and_mpi_start_only_when_asked(fake_initialize):
    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    mpi = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}
    for env, launcher in ((slurm, "Slurm"), (mpi, "Open MPI")):
        calls = len(fake_initialize)
        with pytest.warns(FmjaxWarning, match=f"one of several {launcher} tasks but runs alone: pass --distributed"):
            assert multihost.maybe_initialize_distributed(env) is False
        assert len(fake_initialize) == calls
        assert multihost.maybe_initialize_distributed(env, asked=True) is True
        assert multihost.maybe_initialize_distributed({**env, "FMJAX_DISTRIBUTED": "1"}) is True
    assert [{k: v for k, v in c.items() if k != "initialization_timeout"} for c in fake_initialize] == [{}] * 4


def test_maybe_initialize_distributed_from_env(fake_initialize, monkeypatch):
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert multihost.maybe_initialize_distributed(explicit) is True
    timeout = multihost.DEFAULT_TIMEOUT + 30  # JAX's own limit, after the watchdog's
    assert fake_initialize[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                                   "initialization_timeout": timeout}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:99")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    monkeypatch.setenv(multihost.TIMEOUT_VAR, "7")
    assert multihost.maybe_initialize_distributed() is True
    assert fake_initialize[-1] == {"coordinator_address": "10.0.0.2:99", "num_processes": 4, "process_id": 0,
                                   "initialization_timeout": 37}
    with pytest.raises(LaunchError, match="JAX_PROCESS_ID"):
        multihost.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(LaunchError, match=multihost.TIMEOUT_VAR):
        multihost.maybe_initialize_distributed({**explicit, multihost.TIMEOUT_VAR: "soon"})
    for env in ({"FMJAX_DISTRIBUTED": "1"}, {"TPU_WORKER_HOSTNAMES": "w0,w1"},
                {"MEGASCALE_COORDINATOR_ADDRESS": "x"}):
        calls = len(fake_initialize)
        assert multihost.maybe_initialize_distributed(env) is True, env
        assert fake_initialize[calls:] == [{"initialization_timeout": timeout}]  # JAX detects the rest
    # an initialized runtime is left alone
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    calls = len(fake_initialize)
    assert multihost.maybe_initialize_distributed(explicit) is False
    assert len(fake_initialize) == calls


# ----------------------------------------------------------------------------- two processes (slow)

# one script, two roles: "ref" trains on 4 devices in one process; "worker" is one of 2
# processes with 2 devices each (started from the JAX_* variables), running the mesh step
# over all 4 devices and the pmap step, each process feeding only its rows of every batch
TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import dataclasses, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from fmjax.distributed import multihost, placement
    role, out = sys.argv[1], sys.argv[2]
    assert multihost.maybe_initialize_distributed() == (role == "worker")
    import numpy as np
    from fmjax.config import build
    from fmjax.distributed.mesh import global_mesh, replicated
    from fmjax.methods import registry
    from fmjax.nets import unet
    from fmjax.training.loop import host_batch_indices
    from fmjax.training.state import init_state
    from fmjax.training.step import make_pmap_step_fn, make_step_fn

    assert jax.device_count() == 4 and jax.process_count() == (2 if role == "worker" else 1)
    base = build("tiny")
    config = base.replace(net=dataclasses.replace(base.net, dropout=0.1),
                          train=dataclasses.replace(base.train, hflip=True, patch_size=8))
    objective = registry.get(config.method).objective(config)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 1), dtype=np.uint8)
    class_ids = np.zeros(len(images), np.int32)
    module = unet.UNet(config.net, out_channels=1)
    init_key, run_key = objective.seed_keys(0)
    init = jax.device_get(init_state(config, (16, 16, 1), init_key))
    results = {}

    mesh = global_mesh()
    rep = replicated(mesh)
    state, step_fn = jax.device_put(init, rep), make_step_fn(objective, module, config, mesh)
    for s in range(4):
        idx = host_batch_indices(s, len(images), 8, 0)
        state, m = step_fn(state, placement.assemble_global_batch(images[idx], mesh),
                           placement.assemble_global_batch(class_ids[idx], mesh), jax.device_put(run_key, rep))
    results["mesh"] = state.params

    if role == "worker":
        n = jax.local_device_count()
        state, step_fn = placement.replicate(init), make_pmap_step_fn(objective, module, config)
        for s in range(4):
            idx = host_batch_indices(s, len(images), 8, 0)
            state, m = step_fn(state, placement.shard_batch(images[idx], n), placement.shard_batch(class_ids[idx], n),
                               run_key)
        results["pmap"] = placement.unreplicate(state).params  # global arrays on 2 processes

    for name, params in results.items():
        leaves = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(params)]
        if multihost.is_writer():
            np.savez(f"{out}/{role}_{name}.npz", *leaves)
    print("ok", role, jax.process_index())
""")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    run = lambda role, env: subprocess.Popen([sys.executable, str(script), role, str(tmp_path)], cwd=ROOT, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [run("ref", subprocess_env(4))]
    procs += [run("worker", subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                           JAX_PROCESS_ID=str(i))) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    ref = np.load(tmp_path / "ref_mesh.npz")
    for name in ("worker_mesh", "worker_pmap"):
        got = np.load(tmp_path / f"{name}.npz")
        assert len(got.files) == len(ref.files) > 0
        for key in ref.files:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
