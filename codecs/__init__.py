"""Pixel codecs: one module per codec behind one interface (`base.Codec`), plus the registry."""
