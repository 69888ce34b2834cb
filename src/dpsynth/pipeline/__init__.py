"""The pipeline: the run directory, one stage lifecycle, artifact names and the five stages."""
