"""Segmentation networks built from SAM parts; one module per method.

Plans name a network with a dotted path into this package (``architecture.network_class_name``),
which nnunetv2 resolves with ``pydoc.locate``.
"""
