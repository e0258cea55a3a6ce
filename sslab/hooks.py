"""Work a lower floor names and a higher floor does, handed down at import time.

``SSLMethod.from_config`` (the methods floor) builds a method from the Hydra config tree, which needs the
builders and the config composition of the floors above. Rather than import upward, the method asks this
bottom-floor module, and ``sslab.api`` puts its ``method_from_config`` here when ``sslab`` is imported.
"""

from __future__ import annotations

from typing import Any


def method_from_config(*args: Any, **kwargs: Any) -> Any:
    """Replaced by ``sslab.api.method_from_config`` on ``import sslab``; reached only if that never ran."""
    raise RuntimeError("sslab.api was not imported; import sslab before calling SSLMethod.from_config")
