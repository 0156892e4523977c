"""Process groups and executors for tensor and pipeline parallel."""
