"""Data side of supmae: image files -> decoded, augmented pixels -> batches with patch masks on the device."""
