"""Accuracy under eviction: procedurally generated visual tasks and their exact scoring."""
