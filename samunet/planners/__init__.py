"""SAM-aware experiment planning on top of nnunetv2's fingerprint."""
