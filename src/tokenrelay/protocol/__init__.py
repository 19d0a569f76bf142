"""Client protocols: each turns its wire JSON into one internal ``ChatRequest`` and encodes events back."""
