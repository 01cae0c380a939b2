"""The MedicalZoo zoo's benchmark: ``benchmarks/models.py --system medicalzoo`` (the same options).

Usage: python benchmarks/zoo.py [--size 64] [--only unet3d,vnet] [--repeats 3] [--threads N]

Every zoo network at batch 1 with 2 channels on a ``size``^3 volume (or the largest of 48^3 and
32^3 whose training step fits), against its PyTorch re-creation in the same run: parameters,
FLOPs, forward and training-step times, their ratio, the share of the measured matmul peak,
compile times, and XLA's buffer plan against PyTorch's peak memory. Results go to
``benchmarks/results/models.json`` and ``models.md`` with the other systems' rows.
"""

import pathlib
import runpy
import sys

if __name__ == "__main__":
    if "--system" in sys.argv:
        raise SystemExit("zoo.py: always the medicalzoo rows; use benchmarks/models.py --system")
    sys.argv = [sys.argv[0], "--system", "medicalzoo", *sys.argv[1:]]
    runpy.run_path(str(pathlib.Path(__file__).with_name("models.py")), run_name="__main__")
