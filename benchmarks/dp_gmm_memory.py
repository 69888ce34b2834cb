"""Peak resident memory of dp-gmm's fit (methods/dp_gmm.fit_mixture) on random uint8 images of a given
shape: one subprocess per size, so each peak is its own.

    python benchmarks/dp_gmm_memory.py [--rows 20000,60000] [--resolution 32] [--channels 3] [--json]

The images themselves (uint8) are N*C*H*W bytes; their float32 rows are 4x that. The table prints the
peak beside those two sizes, so the overhead of the fit is read off directly.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(rows: int, resolution: int, channels: int) -> dict:
    import torch

    from dpsynth.methods.dp_gmm import fit_mixture
    from dpsynth.models.gaussian_mixture import GaussianMixture, GaussianMixtureConfig

    torch.manual_seed(0)
    images = torch.randint(0, 256, (rows, channels, resolution, resolution), dtype=torch.uint8)
    labels = torch.randint(0, 2, (rows,))
    mixture = GaussianMixture(GaussianMixtureConfig(resolution=resolution, channels=channels, num_classes=2,
                                                    components=4, rank=10))
    fit_mixture(mixture, images, labels, noise_multiplier=5.0, lloyd_iterations=2, clip=1.0, centred_clip=1.0,
                device=torch.device("cpu"), progress=lambda *a: None, phase="fit")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dim = channels * resolution * resolution
    return {"rows": rows, "dim": dim, "uint8_mb": rows * dim / 2 ** 20, "float32_mb": 4 * rows * dim / 2 ** 20,
            "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="20000,60000")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.resolution, args.channels)))
        return
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(rows), "--resolution", str(args.resolution),
                              "--channels", str(args.channels)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout))
    if args.json:
        print(json.dumps({"results": results}))
        return
    print(f"{'rows':>8} {'dim':>6} {'uint8 MB':>9} {'float32 MB':>11} {'peak MB':>8} {'peak/float32':>13}")
    for r in results:
        print(f"{r['rows']:>8} {r['dim']:>6} {r['uint8_mb']:>9.0f} {r['float32_mb']:>11.0f} {r['peak_mb']:>8.0f} "
              f"{r['peak_mb'] / r['float32_mb']:>13.2f}")


if __name__ == "__main__":
    main()
