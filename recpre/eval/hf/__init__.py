"""Hugging Face modeling code that export_hf copies into exported folders (imports transformers; not recpre)."""
