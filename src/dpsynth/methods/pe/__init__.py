"""PE (Private Evolution): `method` registers it; `api` is the generation-API interface and
its default (dpsynth's public-pretrained EDM); `population` is the released model."""
