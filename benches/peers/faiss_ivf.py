"""FAISS IVF top-k: the same method as faiss_flat.py with an IVF index (nprobe 8)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
runpy.run_path(
    str(Path(__file__).with_name("faiss_flat.py")),
    init_globals={"KIND": "ivf"},
    run_name="__main__",
)
