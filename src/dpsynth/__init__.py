"""dpsynth: differentially private image synthesis with an honest privacy ledger.

The package never imports its CLI; `dpsynth.cli` is loaded only by the console script.
"""

__version__ = "0.1.0"
