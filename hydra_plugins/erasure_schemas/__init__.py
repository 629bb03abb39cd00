"""Hydra plugin: the methods' and the trainer's config schemas are in Hydra's ConfigStore before any composition.

Hydra imports every module of the ``hydra_plugins`` namespace when it starts (``python -m erasure.train``, a sweep's
worker processes, ``hydra.compose`` from a notebook or another tool), so ``conf/method/<name>.yaml`` can start from
``<name>_schema`` (the method's ``Config`` dataclass, where its defaults live once) whoever composes it.
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ErasureSchemas(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from erasure.config import register_method_schemas

        register_method_schemas()  # the search path itself is left as it is
