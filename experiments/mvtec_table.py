"""MVTec-AD: one model per category, per-category and mean image/pixel metrics and AUPRO.

Command:
    python experiments/mvtec_table.py --root /data/mvtec_ad --out results/mvtec --preset paper
Writes results/mvtec/table.{md,csv,json} and one run folder per category.
Expected run time: with the `paper` preset (256x256, 100k steps) many GPU/TPU hours per
category; with `--preset small` about 10 minutes per category on a 2-core CPU (a smoke
run, far from the paper's numbers).
"""
import os

from table import parser, run_table

from fmjax.app import launch
from fmjax.data import mvtec

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="MVTec-AD root (one folder per category)")
    args = p.parse_args()
    launch.start()
    cats = args.categories.split(",") if args.categories else [
        c for c in mvtec.CATEGORIES if os.path.isdir(os.path.join(args.root, c))]
    run_table(lambda c: (f"mvtec:{args.root}", c), cats, args, "MVTec-AD, one model per category")
