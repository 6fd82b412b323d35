"""RADAR: settings.py (pure Python), ddpm.py (the training objective), patches.py and
scorer.py (noise maps, Sobel, features), forest.py (the Isolation Forest as arrays),
method.py (the `Method`)."""
