"""The benchmark engine: contracts (api), registry, suites, runner, parallel dispatch, store,
report and data. Plugins live in the top-level ``algorithms/`` and ``tasks/`` folders."""

__version__ = "0.1.0"
