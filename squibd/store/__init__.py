"""Snapshot stores: deduplicated snapshots in S3-compatible object storage or a directory.

Synchronous and thread-safe like :mod:`squibd.snapshot`; imports no trio. See
:mod:`squibd.store.store` for the layout and the push/gc protocol.
"""
