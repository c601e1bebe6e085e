"""Layer 3, evaluation: ranking and Recall@K under each data set's protocol, image-search and label metrics, the
evaluation tasks by name, the paper's ablation table."""
