"""The aggregation methods: one module each, registered by ``strategies.method.register_method``.

Every module in this package is imported by the registry, so a new method is one new file here.
"""
