"""The GAN family: DP-GAN (DP-SGD on the discriminator), GS-WGAN (gradient-sanitized
WGAN with sharded discriminators) and EFSGD-GAN (DP-GAN with error feedback, a
reconstruction loss and noise injection)."""
