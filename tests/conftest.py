import os
import warnings

import pytest

# Under pytest-xdist (`make test` runs two workers on two cores), each worker's torch keeps to one thread,
# so the workers do not oversubscribe the cores. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Keep tests off the user's real caches; data still comes from the provisioned root.
os.environ.setdefault("DPSYNTH_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "dpsynth-models"))
# Feature caches (features of sensitive images included) stay out of the user's data root too.
os.environ.setdefault("DPSYNTH_FEATURE_CACHE",
                      os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "dpsynth-features"))
# The data owner's secret key (keyed dataset tags and membership) lives outside every run directory.
os.environ.setdefault("DPSYNTH_HOME", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "dpsynth-home"))
warnings.filterwarnings("ignore")
