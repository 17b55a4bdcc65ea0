"""One-off export of the UCI handwritten digits (via scikit-learn) into assets/digits/.

Run once by a maintainer (`pip install scikit-learn && python scripts/export_digits.py`); the runtime only
reads the exported npz, so scikit-learn is not a dependency.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

out = Path(__file__).resolve().parents[1] / "assets" / "digits"
out.mkdir(parents=True, exist_ok=True)
d = load_digits()
np.savez_compressed(out / "digits.npz", images=d.images.astype(np.uint8), labels=d.target.astype(np.uint8))
print(f"wrote {len(d.target)} digits to {out / 'digits.npz'}")
