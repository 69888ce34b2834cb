import os
import warnings

import pytest

# Keep tests off the user's real caches; data still comes from the provisioned root.
os.environ.setdefault("DPSYNTH_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "dpsynth-models"))
warnings.filterwarnings("ignore")
