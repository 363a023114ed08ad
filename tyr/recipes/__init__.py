"""Hydra entry points (``python -m tyr.recipes.<name>``): thin wrappers over the library.

Importing this package registers the config options defined in code: ``search=paper`` is
:class:`tyr.search.settings.SearchSettings`'s defaults, Týr's settings, written down only there.
"""

from hydra.core.config_store import ConfigStore

from tyr.search.settings import paper_config

ConfigStore.instance().store(group="search", name="paper", node=paper_config())
