"""Flower server side of fedlowrank: strategy math (one pure module per method) and thin Flower shells."""
