"""Multi-process tests: real gloo process groups started by :mod:`tests.dist.launcher`."""
