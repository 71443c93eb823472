"""benchmarks/emulator_real_model.py on a tiny model: the device backend on the emulator against
the NumPy backend, step by step (the real model's run is a benchmark: minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "emulator_real_model.py"


def test_emulator_real_model_script_on_a_tiny_model(tiny_models, tmp_path) -> None:
    out = tmp_path / "out.json"
    args = [sys.executable, str(SCRIPT), "--model", str(tiny_models["Q4_1"]), "--tokens", "3",
            "--warp", "32", "--arch", "", "--json", str(out)]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)
    r = json.loads(out.read_text())
    assert len(r["tokens"]) == 3 and len(r["kl_per_step"]) == 4 == len(r["reference_margin"])
    assert r["kv_dtype"] == "float16" and r["warp_size"] == 32 and r["arch"] is None
    # the prompt's last position and three decoded ones: the Q8_1 matvecs' bar (issue 11)
    assert 0 <= r["kl_max"] < 0.01, r["kl_per_step"]
    assert r["all_agree"] == all(r["greedy_agree"])
