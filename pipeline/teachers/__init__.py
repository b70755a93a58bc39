"""The frozen vision teacher: DINOv2 loading and read-outs (`dinov2`), int8 storage of its features
(`quantize`), the targets handed to alignment objectives (`targets`), and where a training batch's
targets come from: cache, cached hidden state, or the live teacher (`target_sources`)."""
