"""The trainer: streams outlier shards, fits a classifier with KD and MICL, evaluates OOD detection."""
