"""Empirical privacy audit: a statistical lower bound on epsilon from planted canaries."""
