"""VisA: one model per category, per-category and mean image/pixel metrics and AUPRO.

Command:
    python experiments/visa_table.py --root /data/visa --out results/visa --preset paper
ROOT is the raw archive (with split_csv/1cls.csv) or the converted MVTec-like layout.
Expected run time: with the `paper` preset many GPU/TPU hours per category; with
`--preset small` about 10-15 minutes per category on a 2-core CPU (reading the large
JPEGs included).
"""
from table import parser, run_table

from fmjax.app import launch
from fmjax.data import visa

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="VisA root")
    args = p.parse_args()
    launch.start()
    cats = args.categories.split(",") if args.categories else list(visa.CATEGORIES)
    run_table(lambda c: (f"visa:{args.root}", c), cats, args, "VisA, one model per category")
