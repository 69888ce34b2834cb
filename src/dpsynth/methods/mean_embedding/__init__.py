"""The mean-embedding family (dp-merf, dp-ntk, dp-kernel): generators trained to match noisy
kernel mean embeddings of the sensitive set. `methods` registers them."""
