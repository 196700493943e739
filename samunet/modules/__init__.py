"""Reusable network parts: LoRA, SAM mask-decoder driving, the SAM input stage."""
