"""Caches over Django's cache framework: ``app.cache`` and ``app.cache_manager.create_cache()``."""

from nocluster.cache.cache import Cache
from nocluster.cache.manager import CacheManager
from nocluster.cache.near import NearCache

__all__ = ["Cache", "CacheManager", "NearCache"]
