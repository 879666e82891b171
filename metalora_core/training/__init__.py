"""Training: the backend protocol, the rectified-flow objective, personalization (stage 2) and meta-training
(stage 1) share these pieces."""
