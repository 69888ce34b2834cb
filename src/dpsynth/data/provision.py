"""`python -m dpsynth.data.provision fashionmnist [--data-root DIR]` for the Makefile.

Kept out of `dpsynth.data.__init__` so `-m` does not import this module twice.
"""

from __future__ import annotations

import argparse
import sys

from dpsynth.errors import DpsynthError

from .fashion import provision_fashionmnist

# Only datasets that can be provisioned without manual steps are listed.
_PROVISIONERS = {"fashionmnist": provision_fashionmnist}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpsynth.data.provision", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(_PROVISIONERS))
    parser.add_argument("--data-root", default=None, help="default: $DPSYNTH_DATA or ~/.cache/dpsynth/data")
    parser.add_argument("--no-download", action="store_true", help="only use local (Debian) copies")
    args = parser.parse_args(argv)
    try:
        where = _PROVISIONERS[args.dataset](args.data_root, download=not args.no_download)
    except DpsynthError as e:
        # Library messages name parameters (`data_root`); this entry point's flag is --data-root.
        print(f"error: {str(e).replace('`data_root`', '--data-root')}", file=sys.stderr)
        return 2
    print(where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
