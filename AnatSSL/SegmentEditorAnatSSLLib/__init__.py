"""The "AnatSSL cross-modality" Segment Editor effect (registered by ``SegmentEditorAnatSSL.py``)."""

from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401
