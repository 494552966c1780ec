"""Conversions between recpre models and other checkpoint formats (Huginn-0125: `recpre.interop.huginn`)."""
