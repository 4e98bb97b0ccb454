"""Runs the README's KD example (the block with '# kd at 20%') on a demo run and prints held-out accuracies.

    datapruning demo --output runs/demo && python scripts/kd_demo.py --root .   # the folder holding runs/demo

The README's numbers for that example come from this script: it runs the block's commands as written, the
two trainer lines once per seed, and prints held-out accuracy without and with KD.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def kd_block() -> list[list[str]]:
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if "# kd at 20%" in b)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("datapruning ")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the folder holding runs/demo (made by 'datapruning demo')")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    for argv in kd_block():
        trainer = argv[1] == "train" and "--save-logits" not in argv
        for seed in range(args.seeds) if trainer else [None]:
            extra = []
            if trainer:
                metrics = Path(tempfile.mkdtemp()) / "m.json"
                extra = ["--seed", str(seed), "--metrics", str(metrics)]
            subprocess.run([sys.executable, "-m", "datapruning", *argv[1:], *extra], cwd=args.root, check=True,
                           capture_output=True, text=True)
            if trainer:
                acc = json.loads(metrics.read_text())["history"][-1]["heldout_acc"]
                results.setdefault("kd" if "--kd" in argv else "no kd", []).append(acc)
    for name, accs in results.items():
        print(f"{name}: held-out accuracy {sum(accs) / len(accs):.3f} (seeds: {', '.join(f'{a:.3f}' for a in accs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
