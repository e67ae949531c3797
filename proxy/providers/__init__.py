"""Upstream providers behind one small interface (``proxy.providers.base.Provider``)."""
