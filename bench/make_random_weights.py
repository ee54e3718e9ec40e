"""Write random weights of the realistic 3 mm architecture as a Dataset297 model folder, for benchmarks.

The phantom-trained networks are tiny, so their timings say nothing about production. This writes what nnU-Net's
default planner gives for a 3 mm CT (PlainConvUNet, 5 stages, 32-320 features, patch 128x112x112, 16.6 M
parameters) in TotalSegmentator's layout: compute per tile, memory and I/O then match the real model; the
masks are meaningless.

    .venv/bin/python bench/make_random_weights.py /tmp/bench_weights
    TOTALSEG_WEIGHTS_PATH=/tmp/bench_weights ...
"""

from __future__ import annotations

import argparse

from ray_app.demo import made_weights as mw
from ray_app.demo.phantom import make_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory to use as TOTALSEG_WEIGHTS_PATH")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random (He) initialisation")
    args = parser.parse_args()

    # Intensity properties as nnU-Net would fingerprint them, from a few 3 mm phantoms.
    cases = [tuple(im.get_fdata(dtype="float32") for im in make_phantom(s, spacing=(3.0,) * 3)) for s in range(3)]
    intensity = mw.IntensityProperties.from_cases(cases)
    plans = mw.make_plans(297, mw.REALISTIC_3MM, intensity, median_shape=(300, 256, 256))
    folder = mw.write_model(args.root, 297, plans, mw.make_dataset_json(297, 1559), seed=args.seed)
    n_params = sum(v.numel() for v in mw.build_network(plans, mw.make_dataset_json(297, 1559), 297).parameters())
    print(f"wrote {folder} ({n_params / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main()
