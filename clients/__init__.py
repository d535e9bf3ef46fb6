"""Flower client side of fedlowrank: the ClientApp that trains and evaluates adapters locally."""
