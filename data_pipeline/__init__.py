"""Source readers, preprocessing into WebDataset shards, loaders and cameras (see DESIGN §2)."""
