"""Store a trained demo model folder as the archive that ships in the package.

    python -m gptoss.demo.train ./demo-run          # ~2 hours on a 2-core CPU
    python scripts/pack_demo.py ./demo-run/mxfp4    # -> gptoss/demo/gpt-oss-demo.tar.xz
"""

import sys
from pathlib import Path

from gptoss.demo import ARCHIVE, pack

if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").exists():
        sys.exit("usage: python scripts/pack_demo.py MODEL_FOLDER (the mxfp4 folder the training wrote)")
    folder = Path(sys.argv[1])
    pack(folder)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"{ARCHIVE}: {ARCHIVE.stat().st_size / 1e6:.1f} MB (the folder is {size / 1e6:.1f} MB)")
