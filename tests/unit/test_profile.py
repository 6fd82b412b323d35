"""The `auto` preset: what kind of images a training set holds, and the config it gets."""
import json

import numpy as np
import pytest

from fmjax.app import train as train_app
from fmjax.config import ConfigError, build, preset, validate
from fmjax.data import profile
from tests.helpers import assert_image_metrics_from_csv, cli, image_scores_csv, save_png


def centred_objects(n, size=28, seed=0):
    """uint8 [n, size, size, 1]: a bright disk of varying radius at the centre, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = rng.uniform(size / 5, size / 3, (n, 1, 1))
    disk = (np.hypot(yy, xx)[None] < radius) * 180.0
    return np.clip(disk + 30 + rng.normal(0, 10, (n, size, size)), 0, 255).astype(np.uint8)[..., None]


def stationary_texture(n, size=28, seed=0):
    """uint8 [n, size, size, 3]: stripes at a random phase and angle per image, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 2.0 + phase)
        out.append(128 + 70 * wave[..., None] + rng.normal(0, 10, (size, size, 3)))
    return np.clip(out, 0, 255).astype(np.uint8)


def test_alignment_separates_objects_from_textures():
    objects, texture = profile.alignment(centred_objects(40)), profile.alignment(stationary_texture(40))
    assert objects > 0.5 and texture < 0.05
    assert profile.kind(centred_objects(40)) == "aligned"
    assert profile.kind(stationary_texture(40)) == "texture"
    # position, not content: the same disks scattered at random places are a texture
    rng = np.random.default_rng(1)
    scattered = np.stack([np.roll(x, tuple(rng.integers(0, 28, 2)), axis=(0, 1)) for x in centred_objects(40)])
    assert profile.alignment(scattered) < profile.ALIGNED_THRESHOLD


@pytest.mark.parametrize("n", [4, 6, 12])
def test_a_few_texture_images_are_not_aligned(n):
    """The mean image of n crops keeps 1/n of their variance by chance (0.17 for 6 crops)."""
    rng = np.random.default_rng(n)
    crops = rng.normal(128, 30, (n, 32, 32, 1))
    assert profile.alignment(crops) < 0.05 and profile.kind(crops) == "texture"
    assert profile.alignment(np.repeat(centred_objects(1), n, axis=0)) == pytest.approx(1.0)


def test_alignment_edge_cases():
    assert profile.alignment(centred_objects(1)) == 0.0
    assert profile.alignment(np.full((5, 8, 8, 1), 7, np.uint8)) == 0.0


@pytest.mark.parametrize("sizes, want", [([[28, 28]], 32), ([[8, 8]], 16), ([[20, 24], [16, 16]], 32),
                                         ([[900, 1024]], 64), ([[64, 48]], 64), ([[33, 10]], 48)])
def test_aligned_size(sizes, want):
    assert profile.aligned_size(np.asarray(sizes)) == want


def write_class_folder(root, images):
    """ROOT/digits/{train/good, test/good} of `images` (the first three again as test images)."""
    for i, x in enumerate(images):
        save_png(root / "digits/train/good" / f"{i:03d}.png", x[..., 0] if x.shape[-1] == 1 else x)
    for i, x in enumerate(images[:3]):
        save_png(root / "digits/test/good" / f"{i:03d}.png", x[..., 0] if x.shape[-1] == 1 else x)
    return root


def test_auto_picks_aligned_for_objects_and_applies_overrides_after(tmp_path):
    root = write_class_folder(tmp_path, centred_objects(24))
    config, (train, info), reason = train_app.resolve_auto(f"folder:{root}", "digits")
    assert reason.startswith("aligned") and config.preset == "aligned"
    assert config.data.image_size == 32 and train.images.shape == (24, 32, 32, 1)
    assert config.train.patch_size == 0 and not config.train.hflip and not config.train.vflip
    assert (config.score.normalize, config.score.map_rule) == ("pixel", "two_sided")
    assert info["preset"].startswith("auto: aligned")
    config, (train, _), _ = train_app.resolve_auto(f"folder:{root}", "digits", overrides=["data.image_size=16",
                                                                                         "score.num_paths=2"])
    assert config.data.image_size == 16 and train.images.shape[1:3] == (16, 16)  # read again at the override
    assert config.score.num_paths == 2 and config.score.normalize == "pixel"


def test_auto_picks_texture_with_flips_for_a_folder_of_patterns(tmp_path):
    root = write_class_folder(tmp_path, stationary_texture(24))
    config, (train, _), reason = train_app.resolve_auto(f"folder:{root}", "digits")
    assert reason.startswith("texture") and config.preset == "texture"
    assert config.data.image_size == 64 and config.train.patch_size == 0 and train.images.shape[1] == 64
    assert config.train.hflip and config.train.vflip
    assert (config.score.normalize, config.score.map_rule, config.score.feature_map) == ("global", "combined", 0.5)
    config, _, _ = train_app.resolve_auto(f"folder:{root}", "digits", overrides=["score.normalize=pixel"])
    assert config.score.normalize == "pixel"  # an override wins


def test_auto_for_another_method_keeps_that_method(tmp_path):
    root = write_class_folder(tmp_path, centred_objects(24))
    config, _, _ = train_app.resolve_auto(f"folder:{root}", "digits", "recon")
    assert config.method == "recon" and config.preset == "aligned" and config.data.image_size == 32


# a network quicker to compile: what these tests check is what the data asks for
SMALL_NET = ["--set", "net.channel_mult=1,2", "--set", "net.attention_rates=2"]


def test_auto_fits_radar_patches_to_images_smaller_than_them(tmp_path, capsys):
    root = write_class_folder(tmp_path, centred_objects(24, size=12))
    config, (train, _), _ = train_app.resolve_auto(f"folder:{root}", "digits", "radar")
    assert config.data.image_size == 16 and train.images.shape[1:3] == (16, 16)
    assert (config.score.patch_size, config.score.patch_stride) == (16, 16)
    assert config.score.normalize == "pixel"  # the rest of RADAR's aligned preset stays
    validate(config)
    config, _, _ = train_app.resolve_auto(f"folder:{root}", "digits", "flow_mismatch")
    assert config.score == preset("aligned").score
    code, out, err = cli(capsys, "train", "--data", f"folder:{root}", "--category", "digits", "--out",
                         tmp_path / "run", "--method", "radar", "--set", "train.steps=2", "--set", "score.n_estimators=5",
                         *SMALL_NET)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["score"]["patch_size"] == 16


def test_auto_is_the_default_of_fmjax_train(tmp_path, monkeypatch, capsys):
    root = write_class_folder(tmp_path, centred_objects(24))
    seen = {}

    def fake_train_run(config, spec, category, run_dir, data=None, **_):
        seen.update(config=config, data=data)
        raise SystemExit(0)

    monkeypatch.setattr(train_app, "train_run", fake_train_run)
    with pytest.raises(SystemExit):
        cli(capsys, "train", "--data", f"folder:{root}", "--category", "digits", "--out", tmp_path / "run",
            "--set", "train.steps=3")
    assert seen["config"].preset == "aligned" and seen["config"].train.steps == 3
    assert seen["data"][0].images.shape[1:] == (32, 32, 1)
    assert "preset auto: aligned" in capsys.readouterr().out


def test_auto_is_not_a_config():
    with pytest.raises(ConfigError, match="chosen from the training data"):
        build("auto")


def test_normalised_scoring_without_held_out_normals_stops_before_training(tmp_path, capsys):
    from tests.helpers import assert_one_line_error

    root = write_class_folder(tmp_path, centred_objects(4))
    code, _, err = cli(capsys, "train", "--data", f"folder:{root}", "--category", "digits", "--out", tmp_path / "run")
    assert_one_line_error(code, err)
    assert "held-out normal images" in err and "score.normalize=none" in err
    assert not (tmp_path / "run").exists()


def test_a_folder_of_ten_images_trains_with_normalised_scoring(tmp_path, capsys):
    root = write_class_folder(tmp_path, centred_objects(10))
    code, _, err = cli(capsys, "train", "--data", f"folder:{root}", "--category", "digits", "--out", tmp_path / "run",
                       "--preset", "tiny", "--set", "train.steps=2", "--set", "score.normalize=global", "--no-progress")
    assert code == 0, err
    from fmjax import runs

    calibration = json.loads((tmp_path / "run" / runs.CALIBRATION).read_text())
    assert len(calibration[runs.HELD_OUT]) == 2  # one fits the statistics, one the thresholds


def test_a_one_class_folder_is_evaluated_without_maps_unless_they_are_exported(tmp_path, capsys):
    """Test images of another class and no masks: an image score of the feature bank (the
    aligned preset's kind) is read without the maps, also when the scores alone are
    exported (--scores-out); exporting the maps gives the same image metrics and scores."""
    root = write_class_folder(tmp_path, centred_objects(24))
    for i, x in enumerate(stationary_texture(3, seed=5)):
        save_png(root / "digits/test/stripes" / f"{i:03d}.png", x.mean(-1).astype(np.uint8))
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", f"folder:{root}", "--category", "digits", "--out", run,
                       "--preset", "tiny", "--set", "train.steps=2", "--set", "score.feature_knn=3", "--no-progress")
    assert code == 0, err
    assert cli(capsys, "evaluate", "--run", run, "--scores-out", tmp_path / "scores")[0] == 0
    alone = json.loads((run / "metrics.json").read_text())
    assert cli(capsys, "evaluate", "--run", run, "--maps-out", tmp_path / "maps")[0] == 0
    exported = json.loads((run / "metrics.json").read_text())
    assert (alone["maps_scored"], exported["maps_scored"]) == (False, True)
    score = json.loads((run / "config.json").read_text())["score"]
    assert alone["network_calls_per_image"] == 1  # the features alone
    assert exported["network_calls_per_image"] == score["num_paths"] * score["num_times"] + 1
    for key in ("image_auroc", "image_ap", "image_f1_max", "image_accuracy_at_threshold"):
        assert alone[key] == pytest.approx(exported[key], abs=1e-6), key
    scores = image_scores_csv(tmp_path / "scores" / "digits" / "image_scores.csv")
    with_maps = image_scores_csv(tmp_path / "maps" / "digits" / "image_scores.csv")
    assert list(scores) == list(with_maps) and len(scores) == 3 + len(list((root / "digits/test/good").iterdir()))
    for name, (label, score, decided) in scores.items():
        assert (label, decided) == (with_maps[name][0], with_maps[name][2]) and decided in ("0", "1")
        assert score == pytest.approx(with_maps[name][1], rel=1e-4), name  # two float32 paths
    assert_image_metrics_from_csv(scores, alone)
    assert not list((tmp_path / "scores").rglob("*.tiff"))
    assert np.isnan(alone["pixel_auroc"]) and np.isnan(alone["pixel_f1_at_threshold"])
    assert np.isnan(exported["pixel_auroc"]) and np.isnan(exported["pixel_f1_at_threshold"])
