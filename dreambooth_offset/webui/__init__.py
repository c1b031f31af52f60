"""LoRA files for AUTOMATIC1111, Forge and ComfyUI: key names, conversion, metadata, `export`/`import`/`inspect`."""
