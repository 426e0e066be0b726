"""Contrast strategies, one file each, all subclasses of :class:`~.base.ContrastStrategy`.

Import them from the package root (``from contrastive_decoding import DoLa``); this package does not
import its modules eagerly, so that the shared machinery can import :mod:`.base` on its own.
"""
