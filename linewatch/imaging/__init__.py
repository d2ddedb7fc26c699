"""Images: decoding folders of parts into RGB uint8 (images) and drawing what an engineer looks at (overlays)."""
