"""DeepEP V1 exposes its event classes from `deep_ep.utils`; Megatron-Core imports them from there."""

from .events import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
