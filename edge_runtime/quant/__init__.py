"""Quantizers shared by export (which encodes) and the runtime (which decodes), so the two cannot disagree."""
