"""`fmjax predict`: score image files with a trained run; per-image scores and decisions,
heat-map overlays and float maps at each image's own size."""
from __future__ import annotations

import numpy as np

from fmjax import runs
from fmjax.app.evaluate import display_max
from fmjax.eval import writers
from fmjax.files import Outputs

__all__ = ["main", "predict"]


def predict(run: runs.Run, input_path, out_dir: str, category: str | None = None) -> list[dict]:
    """Scores the image file(s) at `input_path` (a file, a folder or a list); writes
    OUT/scores.csv, OUT/overlays/*.png, OUT/maps/*.tiff, published as a whole (an existing
    OUT that fmjax wrote is replaced). anomalous: the run's decision (Run.decide),
    threshold: the image threshold fitted on normals. category: which of a
    class-conditional run's categories the images show (required for such a run)."""
    from fmjax.data import folder

    class_id = run.class_id(category)
    with Outputs() as out:
        stage = out.folder(out_dir, "--out")
        d = run.config.data
        paths = folder.image_paths(input_path)
        images, names, sizes = folder.load_images(paths, d.image_size, d.channels)
        maps, scores = run.score(images, np.full(len(images), class_id, np.int32))
        return writers.write_predictions(stage, paths, names, sizes, images.shape[-1], maps, scores,
                                         run.decide(scores), run.calibration.get("image_threshold"),
                                         display_max(run, maps))


def main(args) -> None:
    import sys

    from fmjax.methods.batches import scoring_progress

    with runs.lock(args.run, "predict", shared=True):
        run = runs.load_run(args.run, args.set)
        if run.refit:
            print(f"fmjax predict: note: {run.refit}", file=sys.stderr)
        with scoring_progress("scoring", not args.no_progress and sys.stderr.isatty()):
            rows = predict(run, args.input, args.out, args.category)
    flagged = sum(1 for r in rows if r["anomalous"] == 1)
    print(f"scored {len(rows)} image{'s' * (len(rows) != 1)} ({flagged} anomalous by {run.method.decision_rule}) "
          f"-> {args.out}")
