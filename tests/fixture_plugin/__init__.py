"""A plugin installed only under the test settings: it records every run of its ``install()``."""
