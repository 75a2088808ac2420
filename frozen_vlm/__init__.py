"""frozen_vlm."""
